"""What every export target shares: the run loaded in float64 (merged for LoRA), the checks its output must pass
against it (logits, the chat template's tokens), and which `--out` may be replaced.

The targets (export/merged.py, export/llamacpp.py) write under a temporary name, reload and compare, and only
then rename into place, so a failed check or a crash never leaves a half or stale export.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config.load import dataset_specs
from peftkit.config.schema import ModelArgs
from peftkit.data.dataset import Dialogue, conversations
from peftkit.data.encode import encode_messages
from peftkit.data.render import render_prompt
from peftkit.errors import PeftkitError
from peftkit.infer.merging import merged
from peftkit.model.families import float64_load_kwargs
from peftkit.model.loading import load_trained
from peftkit.model.quantization import prequantized
from peftkit.rundir import Run
from peftkit.stages import Stage
from peftkit.stages import stage as stage_of

logger = logging.getLogger("peftkit")

# The check runs in float64: in float32 the same merged weights differ from base + adapter by up to
# ~1e-4 on SmolLM2 from summation order alone (9.7e-5 measured, even merged in memory), which
# would make a 1e-4 limit a coin toss; in float64 what remains is the export's own rounding.
MAX_LOGIT_DIFF = 1e-4
EXPORT_MARKER = "export_report.json"  # written last into every export: a folder that has it may be replaced
_CHECK_PROMPTS = ["Hello! Who are you?", "高勇：男，中国国籍，无境外居留权，"]


@dataclass
class ExportReport:
    """What the checks measured; written as export_report.json inside the export."""

    finetuning_type: str
    max_logit_diff: float
    records_checked: int
    out: str


def run_model_config(run: Run) -> Any:
    """The transformers config of the model the run's weights make (the base's for a LoRA run)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(run.base_model)


def _load_run(run: Run, entry: Stage, pad_token_id: int | None) -> tuple[Any, Any]:
    """The run in float64 (base + adapter for lora), and the dtype its weights are stored in."""
    import torch
    from transformers import AutoConfig

    run_dir, path = run.path, run.base_model  # the base of a LoRA run; the run folder itself for freeze / full
    if run.is_adapter:
        method = prequantized(path)
        if method:  # a QLoRA run with model.quantization_bit has an unquantized base on disk: that one merges
            raise PeftkitError(
                f"{run_dir}: its base {path} is a quantized checkpoint ({method}); merging LoRA into quantized "
                "weights would round much of the update away, so the export is refused. Serve the adapter on that "
                "base as it is (peftkit serve --adapter, or vLLM), or point adapter_config.json's "
                "base_model_name_or_path at the unquantized original and export again")
    config = AutoConfig.from_pretrained(path)
    stored = getattr(torch, str(config.dtype).replace("torch.", "")) if config.dtype else torch.float32
    model = load_trained(ModelArgs(name_or_path=path), run_dir, entry.name, run.is_adapter, pad_token_id,
                         restore_head=False, dtype=torch.float64, **float64_load_kwargs(config))  # Head.files: copied
    text = model.config.get_text_config()  # (an image-text config keeps it on its language model's)
    if getattr(text, "pad_token_id", None) is None:  # the export's config names the pad token, whatever the head
        text.pad_token_id = pad_token_id
    return model, stored


def _check_prompts(tokenizer: Any, entry: Stage) -> list[list[int]]:
    if not entry.chat_template or not tokenizer.chat_template:  # texts (cls, pt): no chat template to render
        return [tokenizer(text)["input_ids"] for text in _CHECK_PROMPTS]
    return [render_prompt(tokenizer, [{"role": "user", "content": text}]) for text in _CHECK_PROMPTS]


def _logits(model: Any, prompts: list[list[int]]) -> list[Any]:
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0] for ids in prompts]


def _training_records(run: Run, limit: int) -> list[Dialogue]:
    """The first training records, read as the run read them (its config.yaml), if the files still exist."""
    args = run.data
    if args is None:
        return []
    specs = [s for s in dataset_specs(args, "train")[0] if Path(s.path).exists()]
    return conversations(specs[0], args, limit) if specs else []


def check_template(run_tokenizer: Any, exported: Any, records: list, cutoff_len: int) -> None:
    """The exported tokenizer (or the folder holding it) renders each training record to the run's tokens."""
    from transformers import AutoTokenizer

    if isinstance(exported, Path):
        exported = AutoTokenizer.from_pretrained(exported)
    for record in records:
        messages, where, tools = record.messages, record.where, record.tools
        a, _ = encode_messages(run_tokenizer, messages, cutoff_len, where, tools=tools)
        b, _ = encode_messages(exported, messages, cutoff_len, where, tools=tools)
        if a != b:
            raise PeftkitError(
                f"export check failed: the exported tokenizer renders {where[0]} record {where[1]} differently "
                "from training (chat template or tokenizer changed); the export was not written"
            )


def save_processor(run: Run, folder: Path, records: list[Dialogue]) -> None:
    """An image-text run's processor (image processor, chat template) into the export, checked to load back and to
    render the training records as the run's does; nothing for a text run."""
    from transformers import AutoProcessor

    from peftkit.data.render import image_renderer, template_messages
    from peftkit.model.loading import has_images, load_processor

    processor = load_processor(ModelArgs(name_or_path=run.base_model))
    if processor is None:
        return
    processor.save_pretrained(folder)
    exported = AutoProcessor.from_pretrained(folder)
    ours, theirs = image_renderer(processor), image_renderer(exported)
    if not has_images(exported) or any(ours(template_messages(r.messages), False) != theirs(
            template_messages(r.messages), False) for r in records):
        raise PeftkitError("export check failed: the exported processor does not render the training records as "
                           "the run's does (or reads no images); the export was not written")


def check_destination(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an `out` whose replacement would lose what the user did not ask to replace.

    Allowed: a new path, an empty folder, or a previous peftkit export (it holds EXPORT_MARKER);
    anything else only with `overwrite`. Never the run itself, a folder inside it or above it, the
    working directory or the home folder (or any folder above them), whatever the flag says.
    """
    run, target = run_dir.resolve(), out.resolve()
    protected = {"the run being exported": run, "the working directory": Path.cwd().resolve(),
                 "the home folder": Path.home().resolve()}
    if target == run or run in target.parents:
        raise PeftkitError(f"--out {out}: inside the run being exported ({run_dir}); choose a folder outside it")
    for what, path in protected.items():
        if target == path or target in path.parents:
            raise PeftkitError(f"--out {out}: replacing it would delete {what} ({path}); choose a new folder")
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise PeftkitError(f"--out {out}: exists and is not a folder; choose a new path")
    if overwrite or not any(target.iterdir()) or (target / EXPORT_MARKER).is_file():
        return
    raise PeftkitError(f"--out {out}: the folder holds files that are not a peftkit export; choose a new folder, "
                       "or pass --overwrite to replace it whole")


@dataclass
class _Merged:
    """A run loaded for export: the merged model in float64, its stored dtype, and what the checks compare with."""

    finetuning_type: str
    entry: Stage
    tokenizer: Any
    model: Any
    stored_dtype: Any
    prompts: list[list[int]]
    reference: list[Any]  # the run's logits on `prompts` (base + adapter, before merging)
    records: list[Dialogue]  # training records whose rendering is re-checked


def load_merged(run: Run) -> _Merged:
    from transformers import AutoTokenizer

    finetuning_type, entry = run.finetuning_type, stage_of(run.stage)
    tokenizer = AutoTokenizer.from_pretrained(run.path)
    model, stored_dtype = _load_run(run, entry, tokenizer.pad_token_id)
    prompts = _check_prompts(tokenizer, entry)
    reference = _logits(model, prompts)
    model = merged(model)  # in float64: the only rounding is the final cast (a quantized base was refused)
    records = _training_records(run, limit=16) if entry.chat_template else []
    return _Merged(finetuning_type, entry, tokenizer, model, stored_dtype, prompts, reference, records)


def max_diff(reference: list[Any], model: Any, prompts: list[list[int]]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(reference, _logits(model, prompts)))
