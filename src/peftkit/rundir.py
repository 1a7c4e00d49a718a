"""What a finished run folder (a `train.output_dir`) says about itself: the one reader of its files.

A run holds finetuning_args.json (what trained), config.yaml (the resolved config it ran with) and, for LoRA,
adapter_config.json naming its base model. Chat and serve read a run through here, so `--adapter RUN` loads the
run's own base model, stage and template, not the embedded default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from peftkit.config.schema import DataArgs, ModelArgs
from peftkit.constants import CONFIG_FILE, FINETUNING_ARGS_FILE
from peftkit.errors import PeftkitError

ADAPTER_CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class Run:
    """A trained run as its files describe it."""

    path: Path
    finetuning_type: str  # lora | freeze | full
    stage: str
    model: ModelArgs  # the model section it trained with (dtype, attention, remote code, quantization)
    template: str | None  # data.template
    base_model: str  # a LoRA run's base (adapter_config.json); the run folder itself for freeze / full
    data: DataArgs | None  # the data section it trained with (None: a run without config.yaml)

    @property
    def is_adapter(self) -> bool:
        return self.finetuning_type == "lora"


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftkitError(f"{path}: cannot be read ({e})") from e


def config_file(path: str | Path) -> Path:
    """Where a run keeps the resolved config it ran with: train writes it, a resume compares against it, the board
    resumes from it."""
    return Path(path) / CONFIG_FILE


def run_config(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """A run's config.yaml as text and as a mapping ((None, {}) when it is missing or unreadable): what the board
    shows and compares, and what the model card describes, as written."""
    try:
        text = config_file(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None, {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    return text, data if isinstance(data, dict) else {}


def adapter_config(path: str | Path) -> dict[str, Any] | None:
    """peft's adapter_config.json of a LoRA run (None: the folder holds no adapter)."""
    file = Path(path) / ADAPTER_CONFIG_FILE
    return _json(file) if file.is_file() else None


def read_run(path: str | Path) -> Run:
    """The run in `path`; a folder that is not a peftkit run is a PeftkitError saying so."""
    folder = Path(path)
    args_file = folder / FINETUNING_ARGS_FILE
    if not args_file.is_file():
        raise PeftkitError(f"{folder}: no {FINETUNING_ARGS_FILE} — not a peftkit output_dir (train one with "
                           "`peftkit train`)")
    finetuning_type = str(_json(args_file).get("finetuning_type", "lora"))
    raw: dict[str, Any] = {}
    if (folder / CONFIG_FILE).is_file():
        try:
            raw = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise PeftkitError(f"{folder / CONFIG_FILE}: cannot be read ({e})") from e
    model = ModelArgs(**_known(ModelArgs, raw.get("model")))
    data = DataArgs(**_known(DataArgs, raw.get("data"))) if raw.get("data") else None
    if finetuning_type == "lora":
        adapter = adapter_config(folder)
        if adapter is None:
            raise PeftkitError(f"{folder}: a LoRA run without {ADAPTER_CONFIG_FILE} (has it finished saving?)")
        base = str(adapter.get("base_model_name_or_path") or model.name_or_path)
    else:
        base = str(folder)
    return Run(folder, finetuning_type, str(raw.get("stage", "sft")), model,
               (raw.get("data") or {}).get("template"), base, data)


def _known(section: type, values: Any) -> dict[str, Any]:
    """The keys of a config section this peftkit knows (a run written by another version may have others)."""
    names = {f.name for f in fields(section)}
    return {k: v for k, v in (values or {}).items() if k in names}
