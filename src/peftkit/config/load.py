"""Read a YAML config, apply `section.key=value` overrides, type-check it, report all problems at once.

This is the one place a config key is read. The `train` section is checked against transformers'
Seq2SeqTrainingArguments fields, so users write the names they already know. Cross-field and value
checks are config/validate.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from peftkit.atomic import write_text_atomic
from peftkit.config.schema import (
    FORMAT_NAMES,
    SECTIONS,
    DataArgs,
    DatasetSpec,
    RunConfig,
    TrainExtras,
)
from peftkit.errors import ConfigError
from peftkit.stages import STAGES

# Keys peftkit sets in `train` when the user does not: quiet by default, no hub, safe for CPU.
TRAIN_DEFAULTS: dict[str, Any] = {"report_to": "none", "logging_steps": 10, "save_strategy": "no",
                                  "ddp_find_unused_parameters": False}  # adapters use every trainable weight


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a config.

    Args:
        path: a YAML file, or None for defaults plus overrides only.
        overrides: `section.key=value` strings; values are parsed as YAML (`2`, `1e-4`, `[a, b]`).

    Raises:
        ConfigError: listing every problem found, before any model is loaded.
    """
    source = str(path) if path else "<overrides>"
    raw, issues = _read_yaml(path)
    for override in overrides or []:
        issues += _apply_override(raw, override)
    cfg, found = _build(raw)
    from peftkit.config.validate import validate  # validate reads load's helpers: imported here, not above

    issues += found + validate(cfg)  # keys that failed above keep their defaults here
    if issues:
        raise ConfigError(issues, source)
    return cfg


def _read_yaml(path: str | Path | None) -> tuple[dict[str, Any], list[str]]:
    if path is None:
        return {}, []
    p = Path(path)
    if p.is_dir():
        return {}, [f"config file {str(p)!r} is a folder — give the path of a .yaml file (see examples/)"]
    if not p.is_file():
        return {}, [f"config file {str(p)!r} does not exist — give the path of a .yaml file (see examples/)"]
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        return {}, [f"{p} is not valid YAML: {e}"]
    except (UnicodeDecodeError, OSError) as e:
        return {}, [f"{p} cannot be read as UTF-8 text ({e}) — save it as UTF-8 YAML"]
    if data is None:
        return {}, [f"{p} is empty — a config names at least train.output_dir and data.train (see examples/)"]
    if not isinstance(data, dict):
        return {}, [f"{p}: the top level must be a mapping of sections (model, data, finetuning, train, ...)"]
    return data, []


def _apply_override(raw: dict[str, Any], override: str) -> list[str]:
    key, sep, value = override.partition("=")
    if key == "stage" and sep:
        raw["stage"] = value.strip()
        return []
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        return [f"override {override!r}: expected section.key=value, e.g. train.max_steps=2"]
    target = raw.setdefault(section, {})
    if section == "model" and isinstance(target, str):  # `model: NAME` shorthand
        target = raw[section] = {"name_or_path": target}
    if not isinstance(target, dict):
        return [f"override {override!r}: section {section!r} is not a mapping in the config"]
    try:
        target[name] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:  # not YAML (an unbalanced bracket, say): keep the text; type checks follow
        target[name] = value
    return []


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(choices))}"


def _build(raw: dict[str, Any]) -> tuple[RunConfig, list[str]]:
    issues: list[str] = []
    if isinstance(raw.get("model"), str):
        raw = {**raw, "model": {"name_or_path": raw["model"]}}
    valid_sections = [*SECTIONS, "train", "stage"]
    for section in raw:
        if section not in valid_sections:
            issues.append(f"unknown section {section!r}{_suggest(str(section), valid_sections)}")
    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            issues.append(f"{section}: expected a mapping of keys, got {values!r}")
            values = {}
        built[section], found = _build_section(section, cls, values)
        issues += found
    train = raw.get("train") or {}
    if not isinstance(train, dict):
        issues.append(f"train: expected a mapping of TrainingArguments keys, got {train!r}")
        train = {}
    built["train"], found = _check_train(train)
    issues += found
    stage = raw.get("stage", "sft")
    if STAGES.get(stage) is None:
        issues.append(f"stage={stage!r}: must be one of {', '.join(STAGES)}")
    else:
        built["stage"] = stage
    return RunConfig(**built), issues


def _build_section(section: str, cls: type, values: dict[str, Any]) -> tuple[Any, list[str]]:
    issues: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            issues.append(f"{section}.{key}: unknown key{_suggest(str(key), list(fields))}")
            continue
        value, problem = coerce(value, typing.get_type_hints(cls)[key])
        if problem:
            issues.append(f"{section}.{key}={values[key]!r}: {problem}")
            continue
        kwargs[key] = value
    return cls(**kwargs), issues


def _check_train(train: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    from transformers import Seq2SeqTrainingArguments

    issues: list[str] = []
    fields = {f.name: f.type for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    fields.update(typing.get_type_hints(TrainExtras))
    checked = {**TRAIN_DEFAULTS, "use_cpu": not _has_accelerator()}
    for key, value in train.items():
        if key not in fields:
            issues.append(f"train.{key}: not a Seq2SeqTrainingArguments field{_suggest(str(key), list(fields))}")
            continue
        if value is False and key.endswith("_strategy"):  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if isinstance(value, bool) and key == "peftkit_speedups":  # and a bare `off` / `on` as false / true
            value = "on" if value else "off"
        if key == "fsdp" and isinstance(value, bool):  # transformers 5 style: fsdp: true + fsdp_config
            checked[key] = value
            continue
        if key == "bf16" and value == "auto":  # resolved here, so config.yaml records what ran
            checked[key] = bf16_is_fast()
            continue
        value, problem = coerce(value, fields[key])
        if problem:
            issues.append(f"train.{key}={train[key]!r}: {problem}")
            continue
        checked[key] = value
    return checked, issues


# Set to 0 or 1, `train.bf16: auto` on a CPU reads it instead of the CPU's flags: a developer on either kind of
# CPU runs the suite as it runs on the other (README "Tests").
CPU_BF16_ENV = "PEFTKIT_CPU_BF16"


def bf16_is_fast() -> bool:
    """`train.bf16: auto`: bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with
    AVX512-BF16 or AMX). Elsewhere bf16 is emulated: on a 2-core AVX-512 CPU without them, bf16 autocast
    trained at 75 real tokens/s against fp32's 200 (SmolLM2-135M LoRA, packed rows of 1024)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if _has_accelerator():
        return False
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced:
        if forced not in ("0", "1"):
            raise ConfigError([f"${CPU_BF16_ENV}={forced!r}: must be 0 or 1 (what train.bf16: auto means on this "
                               "CPU), or unset to follow the CPU's flags"])
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def _has_accelerator() -> bool:
    """Without one, transformers refuses bf16 unless use_cpu is set; peftkit sets it for you."""
    import torch

    return torch.cuda.is_available() or torch.xpu.is_available() or torch.backends.mps.is_available()


def coerce(value: Any, hint: Any) -> tuple[Any, str | None]:
    """Check `value` against a type hint, converting the safe cases (an int for a float, '1e-4' for a float).

    Hints this checker does not understand (enums, config objects) pass unchanged: transformers
    checks those itself when the TrainingArguments are built.
    """
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            return (None, None) if type(None) in options else (value, "must not be empty")
        problems = []
        for option in options:
            if option is type(None):
                continue
            converted, problem = coerce(value, option)
            if problem is None:
                return converted, None
            problems.append(problem)
        return value, " or ".join(dict.fromkeys(problems))
    if origin is Literal:
        allowed = typing.get_args(hint)
        return (value, None) if value in allowed else (value, f"must be one of {', '.join(map(str, allowed))}")
    if origin is list:
        (item_hint,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            return value, f"must be a list, e.g. [{value}]"
        out = []
        for item in value:
            converted, problem = coerce(item, item_hint)
            if problem:
                return value, f"list item {item!r}: {problem}"
            out.append(converted)
        return out, None
    return _coerce_scalar(value, hint)


def _coerce_scalar(value: Any, hint: Any) -> tuple[Any, str | None]:
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (value, "must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return value, "must be an integer"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value), None
            except ValueError:
                pass
        return value, "must be a number"
    if hint is str:
        return (value, None) if isinstance(value, str) else (value, "must be a string")
    if hint is dict or typing.get_origin(hint) is dict:
        return (value, None) if isinstance(value, dict) else (value, "must be a mapping")
    return value, None


def adapter_paths(ft: Any) -> list[str]:
    """finetuning.adapter_name_or_path as a list (earlier ones are merged, the last one trains)."""
    value = ft.adapter_name_or_path
    return [value] if isinstance(value, str) else list(value or [])


def looks_like_hub_id(path: str) -> bool:
    """`org/name` with no file suffix and no leading ./ or /: read from the hub if not found locally."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not Path(path).suffix


def dataset_specs(args: DataArgs, key: str) -> tuple[list[DatasetSpec], list[str]]:
    """`data.train` or `data.eval` as DatasetSpecs with the data-level defaults filled in, and the problems."""
    value = getattr(args, key)
    entries = [value] if isinstance(value, (str, dict)) else list(value or [])
    specs: list[DatasetSpec] = []
    issues: list[str] = []
    for i, entry in enumerate(entries):
        where = f"data.{key}[{i}]" if len(entries) > 1 else f"data.{key}"
        raw = {"path": entry} if isinstance(entry, str) else dict(entry)
        spec, found = _build_section(where, DatasetSpec, raw)
        issues += found
        if not spec.path:
            issues.append(f"{where}: `path` is missing — the file, folder or hub id to read")
            continue
        spec.format = spec.format or args.format
        spec.columns = spec.columns if spec.columns is not None else args.columns
        spec.tags = spec.tags if spec.tags is not None else args.tags
        spec.max_samples = spec.max_samples or args.max_samples
        if spec.format not in FORMAT_NAMES:
            issues.append(f"{where}.format={spec.format!r}: must be one of {', '.join(FORMAT_NAMES)}")
        if not Path(spec.path).exists() and not looks_like_hub_id(spec.path):
            issues.append(f"{where}: {spec.path!r} does not exist (relative paths start at {os.getcwd()})")
        specs.append(spec)
    return specs, issues


def train_extras(train: dict[str, Any]) -> TrainExtras:
    """peftkit's own keys of the `train` section."""
    return TrainExtras(**{k: v for k, v in train.items() if k in TrainExtras.__dataclass_fields__})


def trackers(train: dict[str, Any]) -> list[str]:
    """`train.report_to` as a list ("none" and "all" as transformers reads them are kept as written)."""
    report_to = train.get("report_to")
    return [report_to] if isinstance(report_to, str) else list(report_to or [])


def build_training_arguments(train: dict[str, Any], stage: str = "sft", quantized: bool = False) -> Any:
    """Seq2SeqTrainingArguments from the `train` section as written, less peftkit's own keys, with what the
    stage needs (an objective's collator reads columns such as rejected_*, which Trainer would otherwise drop).
    A quantized base (QLoRA) gets gradient checkpointing unless the section says otherwise, as peft's k-bit
    preparation and every QLoRA recipe do."""
    from transformers import Seq2SeqTrainingArguments

    args = {k: v for k, v in train.items() if k not in TrainExtras.__dataclass_fields__}
    fields = Seq2SeqTrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    if checkpointing != "gradient_checkpointing":  # transformers >= 5.24 renamed it (the old name warns, same effect)
        for old, new in (("gradient_checkpointing", checkpointing), ("gradient_checkpointing_kwargs", f"{checkpointing}_kwargs")):
            if old in args and new not in args:
                args[new] = args.pop(old)
    if quantized:
        args.setdefault(checkpointing, True)
    if "swanlab" in trackers(train):  # swanlab's own callback instead of transformers' (train/run.py: build_trainer)
        args["report_to"] = [t for t in trackers(train) if t != "swanlab"] or "none"
    if train.get("early_stopping_patience"):
        args.setdefault("metric_for_best_model", "eval_loss")
    # peftkit's datasets hold only what its collators read, and some of it is no model input (an objective's
    # rejected_* columns, an image record's `images`): Trainer must not drop them
    args["remove_unused_columns"] = False
    return Seq2SeqTrainingArguments(**args)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data: every peftkit default spelled out, `train` as given."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config atomically, so a crash never leaves half a config.yaml."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))

