"""Cross-field and value checks of a loaded config: every problem, with the key and what is allowed.

Called by load_config after the types are checked; it never changes the config. It knows only config and the stage
table: what needs the model, the machine or the reward functions is train/preflight.py's, at train's start.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from peftkit.config.load import adapter_paths, build_training_arguments, dataset_specs
from peftkit.config.schema import METRIC_NAMES, DataArgs, DatasetSpec, FinetuningArgs, RunConfig
from peftkit.constants import SHIPPED_TEMPLATES
from peftkit.stages import STAGES


def validate(cfg: RunConfig) -> list[str]:
    """Cross-field and value checks; returns the problems, never changes the config."""
    issues: list[str] = []
    d, ft, ev = cfg.data, cfg.finetuning, cfg.eval
    if d.cutoff_len < 1:
        issues.append(f"data.cutoff_len={d.cutoff_len}: must be at least 1 — set it to the longest example you need, e.g. 1024")
    if d.max_samples is not None and d.max_samples < 1:
        issues.append(f"data.max_samples={d.max_samples}: must be at least 1, or remove the key to use every record")
    train_specs, found = dataset_specs(d, "train")
    issues += found + dataset_specs(d, "eval")[1]
    if ev.dataset and not Path(ev.dataset).exists():
        issues.append(f"eval.dataset: file {ev.dataset!r} does not exist (relative paths start at {os.getcwd()})")
    if d.template is not None and d.template not in SHIPPED_TEMPLATES and not Path(d.template).is_file():
        issues.append(f"data.template={d.template!r}: neither a shipped template ({', '.join(SHIPPED_TEMPLATES)}) "
                      "nor an existing .jinja file")
    if cfg.train.get("eval_strategy", "no") != "no" and not (d.eval or d.val_size):
        issues.append(f"train.eval_strategy={cfg.train['eval_strategy']}: there is nothing to evaluate on — "
                      "set data.eval or data.val_size")
    issues += _check_data_options(d, len(train_specs), cfg.train) + _check_finetuning(ft) + _check_eval(cfg)
    issues += _check_stage(cfg, train_specs + dataset_specs(d, "eval")[0])
    return issues + _check_training_arguments(cfg.train, cfg.stage)


def _check_finetuning(ft: FinetuningArgs) -> list[str]:
    issues: list[str] = []
    if ft.lora_rank < 1:
        issues.append(f"finetuning.lora_rank={ft.lora_rank}: must be at least 1 (8 or 16 are common)")
    if ft.lora_alpha < 1:
        issues.append(f"finetuning.lora_alpha={ft.lora_alpha}: must be at least 1 (commonly 2 x lora_rank)")
    if not 0.0 <= ft.lora_dropout < 1.0:
        issues.append(f"finetuning.lora_dropout={ft.lora_dropout}: must be in [0, 1)")
    for adapter in adapter_paths(ft):
        if not (Path(adapter) / "adapter_config.json").is_file():
            issues.append(f"finetuning.adapter_name_or_path: {adapter!r} has no adapter_config.json (give the "
                          "output_dir of a LoRA run)")
    if ft.loraplus_lr_ratio is not None and ft.loraplus_lr_ratio <= 0:
        issues.append(f"finetuning.loraplus_lr_ratio={ft.loraplus_lr_ratio}: must be positive (16 is common)")
    if ft.finetuning_type == "lora" and ft.freeze_language_model:
        issues.append("finetuning.freeze_language_model: true leaves LoRA nothing to adapt; use finetuning_type: "
                      "freeze (with freeze_vision_tower / freeze_multi_modal_projector: false for what trains)")
    if ft.finetuning_type != "lora" and (ft.use_dora or ft.use_rslora or ft.loraplus_lr_ratio or ft.modules_to_save
                                         or ft.adapter_name_or_path):
        issues.append(f"finetuning: use_dora / use_rslora / loraplus_lr_ratio / modules_to_save / adapter_name_or_path apply to "
                      f"finetuning_type lora, not {ft.finetuning_type}")
    if ft.freeze_trainable_layers < 1:
        issues.append(f"finetuning.freeze_trainable_layers={ft.freeze_trainable_layers}: must be at least 1")
    return issues


def _check_eval(cfg: RunConfig) -> list[str]:
    issues: list[str] = []
    ev = cfg.eval
    for metric in ev.metrics:
        if metric not in METRIC_NAMES:
            issues.append(f"eval.metrics: unknown metric {metric!r}; choose from {', '.join(METRIC_NAMES)}")
    if ev.batch_size < 1:
        issues.append(f"eval.batch_size={ev.batch_size}: must be at least 1")
    if not isinstance(ev.before_training, bool) and ev.before_training < 1:
        issues.append(f"eval.before_training={ev.before_training}: true, false, or a number of records >= 1")
    if ev.max_samples is not None and ev.max_samples < 1:
        issues.append(f"eval.max_samples={ev.max_samples}: must be at least 1, or remove the key")
    if cfg.generate.max_new_tokens < 1:
        issues.append(f"generate.max_new_tokens={cfg.generate.max_new_tokens}: must be at least 1")
    return issues


def _check_stage(cfg: RunConfig, specs: list[DatasetSpec]) -> list[str]:
    """What the stage table (peftkit/stages.py) allows: record formats, packing, streaming."""
    issues = []
    entry = STAGES[cfg.stage]
    formats = entry.formats or ()
    for spec in specs if formats else []:
        if spec.format not in formats:
            issues.append(f"stage {cfg.stage} trains on {' or '.join(formats)} records, but {spec.path!r} has format "
                          f"{spec.format!r}: set data.format: {formats[0]} (and data.columns if the names differ)")
    if cfg.data.streaming and not entry.streaming:
        issues.append(f"data.streaming: stage {cfg.stage} needs the whole training data up front (its classes); "
                      "turn streaming off")
    if cfg.data.packing and not entry.packing:
        packers = " and ".join(n for n, s in STAGES.items() if s.packing)
        issues.append(f"data.packing: stage {cfg.stage} scores whole sequences; packing applies to {packers} only")
    if cfg.finetuning.pref_beta <= 0:
        issues.append(f"finetuning.pref_beta={cfg.finetuning.pref_beta}: must be positive (0.1 is common)")
    if cfg.finetuning.pref_ftx < 0:
        issues.append(f"finetuning.pref_ftx={cfg.finetuning.pref_ftx}: must be 0 or more")
    for key in ("kto_desirable_weight", "kto_undesirable_weight"):
        if getattr(cfg.finetuning, key) <= 0:
            issues.append(f"finetuning.{key}={getattr(cfg.finetuning, key)}: must be positive")
    return issues + _check_grpo(cfg, entry.rewards)


def _check_grpo(cfg: RunConfig, needs_rewards: bool) -> list[str]:
    g, issues = cfg.grpo, []
    if needs_rewards and not g.rewards:
        issues.append(f"grpo.rewards: stage {cfg.stage} needs at least one reward function, e.g. "
                      "[ner_json_f1, {name: json_valid, weight: 0.5}] (see peftkit/train/rewards.py)")
    if g.num_generations < 2:
        issues.append(f"grpo.num_generations={g.num_generations}: at least 2 (answers are compared within their group)")
    for key, low in (("max_new_tokens", 1), ("temperature", 1e-6), ("epsilon", 1e-6)):
        if getattr(g, key) < low:
            issues.append(f"grpo.{key}={getattr(g, key)}: must be positive")
    if not 0 < g.top_p <= 1:
        issues.append(f"grpo.top_p={g.top_p}: must be in (0, 1]")
    if g.beta < 0:
        issues.append(f"grpo.beta={g.beta}: must be 0 (no KL penalty) or more")
    if g.top_k < 0:
        issues.append(f"grpo.top_k={g.top_k}: must be 0 (all tokens) or more")
    return issues


def _check_data_options(d: DataArgs, n_train: int, train: dict[str, Any]) -> list[str]:
    issues: list[str] = []
    if d.interleave_probs is not None:
        if d.mix_strategy == "concat":
            issues.append("data.interleave_probs: only used with data.mix_strategy interleave_under or interleave_over")
        elif len(d.interleave_probs) != n_train or abs(sum(d.interleave_probs) - 1) > 1e-6:
            issues.append(f"data.interleave_probs={d.interleave_probs}: needs one probability per training dataset "
                          f"({n_train}), summing to 1")
    if d.val_size < 0 or (d.val_size >= 1 and d.val_size != int(d.val_size)):
        issues.append(f"data.val_size={d.val_size}: a fraction in [0, 1) or a whole count of examples")
    if d.val_size and d.eval:
        issues.append("data.val_size and data.eval: choose one source of evaluation data")
    if d.preprocessing_num_workers is not None and d.preprocessing_num_workers < 1:
        issues.append(f"data.preprocessing_num_workers={d.preprocessing_num_workers}: at least 1, or remove the key")
    if d.streaming:
        if not isinstance(train.get("max_steps"), int) or train["max_steps"] <= 0:
            issues.append("data.streaming: the length of a stream is unknown, so set train.max_steps")
        if d.val_size:
            issues.append("data.streaming: val_size needs the whole dataset; give data.eval instead")
        if train.get("train_sampling_strategy") == "group_by_length":
            issues.append("data.streaming: train.train_sampling_strategy group_by_length needs the whole dataset")
    return issues


def _check_training_arguments(train: dict[str, Any], stage: str) -> list[str]:
    """Let transformers check what only it knows (strategies, schedulers, best-model rules)."""
    if not train.get("output_dir"):
        return ["train.output_dir: missing — where checkpoints and logs go, e.g. train.output_dir=outputs/my_run"]
    missing = _missing_backend(train)
    if missing:
        return [missing]
    try:
        args = build_training_arguments(train, stage)
    except (ValueError, TypeError, ImportError) as e:
        return [f"train: transformers rejected these TrainingArguments: {e}"]
    return _check_argument_values(train, args) + _check_trackers(train)


def _missing_backend(train: dict[str, Any]) -> str | None:
    """The first optional backend the section asks for but is not installed, named before transformers is asked."""
    for key, package, extra in (("deepspeed", "deepspeed", "pip install deepspeed"),
                                ("use_liger_kernel", "liger_kernel", "pip install liger-kernel; its kernels need CUDA")):
        if train.get(key) and importlib.util.find_spec(package) is None:
            return f"train.{key}: the {package} package is not installed ({extra})"
    return None


def _check_argument_values(train: dict[str, Any], args: Any) -> list[str]:
    """Values transformers accepts but training cannot use (read from the built arguments, defaults filled in)."""
    issues = []
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            issues.append(f"train.{key}={getattr(args, key)}: must be at least 1")
    if not math.isfinite(args.learning_rate) or args.learning_rate < 0:
        issues.append(f"train.learning_rate={args.learning_rate}: must be a finite number >= 0 (1e-4 is common for LoRA)")
    if args.max_steps <= 0 and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        issues.append(f"train.num_train_epochs={args.num_train_epochs}: must be above 0, or set train.max_steps > 0")
    minutes = train.get("max_train_minutes")
    if isinstance(minutes, int | float) and not isinstance(minutes, bool) and not (math.isfinite(minutes) and minutes > 0):
        issues.append(f"train.max_train_minutes={minutes!r}: a number of minutes above 0 (or leave it out)")
    if train.get("early_stopping_patience") is not None:
        if train["early_stopping_patience"] < 1:
            issues.append("train.early_stopping_patience: at least 1 evaluation")
        if args.eval_strategy == "no":
            issues.append("train.early_stopping_patience: needs evaluations — set train.eval_strategy (steps or "
                          "epoch) and data.eval or data.val_size")
    return issues


def _check_trackers(train: dict[str, Any]) -> list[str]:
    """Trackers in train.report_to whose package is missing, so the extra to install is named before the run."""
    issues = []
    report_to = train.get("report_to")
    for tracker in [report_to] if isinstance(report_to, str) else report_to or []:
        modules = TRACKER_MODULES.get(tracker, ())
        if modules and all(importlib.util.find_spec(m) is None for m in modules):
            issues.append(f"train.report_to: {tracker} is not installed (pip install 'peftkit[{tracker}]')")
    return issues


# The trackers peftkit has an extra for (pyproject.toml), and the modules any of which makes one usable.
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                   "swanlab": ("swanlab",)}
