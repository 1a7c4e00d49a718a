"""The model card of an export (README.md, the hub's convention) and `--push-to-hub` through huggingface_hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from peftkit.constants import RUN_SUMMARY_FILE
from peftkit.errors import PeftkitError
from peftkit.rundir import run_config

_SHOWN = ("precision", "recall", "f1", "exact_match", "invalid_json", "perplexity", "accuracy", "margin",
          "rewards/accuracies", "rewards/margins", "records")


def _read(path: Path) -> Any:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)


def model_card(run_dir: Path, export_format: str) -> str:
    """README.md for an export of `run_dir`: base model, data, stage, finetuning and training settings, and
    the metrics before and after training from run_summary.json (what the run measured, not re-measured)."""
    config = run_config(run_dir)[1]
    summary = _read(run_dir / RUN_SUMMARY_FILE) or {}
    model, data = config.get("model") or {}, config.get("data") or {}
    finetuning, train = config.get("finetuning") or {}, config.get("train") or {}
    base = model.get("name_or_path", "unknown")
    front = {"base_model": base, "library_name": "gguf" if export_format.startswith("gguf") else "transformers",
             "tags": ["peftkit", config.get("stage", "sft"), finetuning.get("finetuning_type", "lora")]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {run_dir.name}", "",
             f"Fine-tuned from `{base}` with peftkit — stage `{config.get('stage', 'sft')}`, "
             f"`{finetuning.get('finetuning_type', 'lora')}`" + (" (merged)" if finetuning.get("finetuning_type") == "lora"
                                                                 else "") + f", exported as {export_format}.", "",
             "## Training", "",
             f"- data: `{data.get('train')}` (format `{data.get('format')}`, template `{data.get('template')}`, "
             f"cutoff_len {data.get('cutoff_len')}, packing {data.get('packing')})"]
    if finetuning.get("finetuning_type") == "lora":
        lines.append(f"- LoRA: rank {finetuning.get('lora_rank')}, alpha {finetuning.get('lora_alpha')}, "
                     f"target `{finetuning.get('lora_target')}`")
    keys = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
            "gradient_accumulation_steps", "lr_scheduler_type", "bf16", "seed")
    lines.append("- " + ", ".join(f"{k} {train[k]}" for k in keys if k in train))
    if "train_loss" in summary:
        lines.append(f"- training loss {summary['train_loss']:.4f} in {summary.get('train_seconds')} s")
    for when in ("before", "after"):
        metrics = summary.get(f"metrics_{when}")
        if metrics:
            if when == "before":
                lines += ["", "## Evaluation", "", f"On `{metrics.get('dataset')}`:", ""]
            shown = ", ".join(f"{k} {v}" for k, v in metrics.items() if k in _SHOWN)
            lines.append(f"- {when} training: {shown}")
    return "\n".join(lines) + "\n"


def push_to_hub(folder: Path, repo_id: str, private: bool = False, api: Any = None) -> str:
    """Upload a checked export folder as the model repo `repo_id` (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"peftkit export of {folder.name}")
    except Exception as e:  # network, auth or hub errors: the export itself is intact on disk
        raise PeftkitError(f"--push-to-hub {repo_id}: {type(e).__name__}: {e}. The export is complete in {folder}; "
                           "log in with `hf auth login` (or set HF_TOKEN) and push again") from e
    return str(url)
