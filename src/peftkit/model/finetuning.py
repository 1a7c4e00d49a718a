"""Decide what trains: LoRA adapters (peft), the last decoder layers (freeze), or everything (full)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from peftkit.config.load import adapter_paths
from peftkit.config.schema import FinetuningArgs
from peftkit.errors import ConfigError
from peftkit.model.families import (
    LAYER_NAME_PATTERN,
    VISION_PARTS,
    is_image_text,
    text_config,
    transposed_projections,
    vision_parts,
)
from peftkit.model.heads import Head, head_of
from peftkit.model.quantization import is_quantized, prepare_quantized

logger = logging.getLogger("peftkit")


def prepare_for_training(model: Any, args: FinetuningArgs, stage: str = "sft", gradient_checkpointing: bool = False,
                         checkpointing_kwargs: dict | None = None) -> Any:
    """The model ready to train under `args.finetuning_type`; a PeftModel for lora.

    rm trains the value head in full (attached here if the model has none; restored from
    adapter_name_or_path when it has one); cls trains the classification head in full under
    every finetuning_type. A quantized base goes through peft's k-bit preparation first (QLoRA).
    """
    head = head_of(stage)
    if is_quantized(model):
        if args.finetuning_type != "lora":
            raise ConfigError([f"finetuning.finetuning_type={args.finetuning_type}: the base is quantized; only LoRA "
                               "trains on quantized weights"])
        model = prepare_quantized(model, gradient_checkpointing, checkpointing_kwargs)
    if args.finetuning_type == "lora":
        model = _apply_lora(model, args, head)
    elif args.finetuning_type == "freeze":
        language = [] if args.freeze_language_model and is_image_text(model.config) else _freeze_trainable_names(
            model, args)
        _freeze_all_but(model, language + head.freeze_names(model) + _unfrozen_vision(model, args, parameters=True))
    else:
        model.requires_grad_(True)
        _freeze_vision(model, args)
    head.prepare(model, adapter_paths(args)[-1] if adapter_paths(args) else None)
    trainable, total = count_parameters(model)
    logger.info("trainable params: %s / %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


# Initialisations that rewrite the base weights; the saved adapter is converted back (see save_initial_adapter).
CONVERTED_INITS = ("pissa", "olora")
LORA_INIT_DIR = "lora_init"


def save_initial_adapter(model: Any, folder: Path) -> None:
    """Keep the adapter as pissa / olora initialised it (they move part of each weight into it).

    PeftTrainer's final save hands this folder to peft, which turns the trained adapter into a plain
    rank-2r LoRA of the original model, loadable without any conversion step.
    """
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # as peft's conversion expects
    try:
        model.save_pretrained(str(folder))
    finally:
        config.init_lora_weights = init


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting tied weights once and a 4-bit weight by its values
    (bitsandbytes packs two per byte of its storage dtype)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        count = p.numel() * 2 * p.element_size() if type(p).__name__ == "Params4bit" else p.numel()
        total += count
        trainable += count if p.requires_grad else 0
    return trainable, total


def _apply_lora(model: Any, args: FinetuningArgs, head: Head) -> Any:
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    adapters = adapter_paths(args)
    for n, path in enumerate(adapters):
        try:
            model = PeftModel.from_pretrained(model, path, is_trainable=n == len(adapters) - 1)
        except (OSError, ValueError) as e:
            raise ConfigError([f"finetuning.adapter_name_or_path: {path!r} is not a loadable adapter for this "
                               f"model ({e})"]) from e
        if n < len(adapters) - 1:
            model = model.merge_and_unload()  # stacked: earlier adapters become part of the model
    if adapters:
        return model

    target = "all-linear" if args.lora_target == "all" else args.lora_target  # a string is a regex to peft
    config = LoraConfig(
        task_type=getattr(TaskType, head.task_type),
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        fan_in_fan_out=transposed_projections(model),
        init_lora_weights=True if args.init_lora_weights == "default" else args.init_lora_weights,
        modules_to_save=_modules_to_save(model, args, head),
        exclude_modules=_lora_exclude(model, args, head),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft names the missing modules
        raise ConfigError([f"finetuning.lora_target={args.lora_target!r}: {e}"]) from e


def _modules_to_save(model: Any, args: FinetuningArgs, head: Head) -> list[str] | None:
    names = list(dict.fromkeys([*(args.modules_to_save or []), *head.trained_in_full(model),
                                *_unfrozen_vision(model, args)]))
    return names or None


def _lora_exclude(model: Any, args: FinetuningArgs, head: Head) -> str | list[str] | None:
    """What LoRA never wraps: the head's exclusions and, in an image-text model, its vision tower and projector
    (LoRA adapts the language model; an unfrozen tower or projector trains in full). One regex when there are
    vision parts, as peft matches a list by name suffix only."""
    if not is_image_text(model.config):
        return head.lora_exclude
    towers, projectors = vision_parts(model)
    names = [*towers, *projectors, *(head.lora_exclude or [])]
    return "|".join(rf"(?:.*\.)?{re.escape(n)}(?:\..*)?" for n in names) or None


def _unfrozen_vision(model: Any, args: FinetuningArgs, parameters: bool = False) -> list[str]:
    """The vision tower and projector modules (or, with `parameters`, their parameter names) that
    freeze_vision_tower / freeze_multi_modal_projector: false train in full; none for a text model."""
    if not is_image_text(model.config):
        return []
    towers, projectors = vision_parts(model)
    modules = (towers if not args.freeze_vision_tower else []) + (projectors if not args.freeze_multi_modal_projector
                                                                    else [])
    if not parameters:
        return modules
    return [n for n, _ in model.named_parameters() if any(n.startswith(m + ".") for m in modules)]


def _freeze_vision(model: Any, args: FinetuningArgs) -> None:
    """Full tuning of an image-text model: the vision tower, projector and language model its keys keep frozen."""
    if not is_image_text(model.config):
        return
    towers, projectors = vision_parts(model)
    frozen = (towers if args.freeze_vision_tower else []) + (projectors if args.freeze_multi_modal_projector else [])
    trained = set(_unfrozen_vision(model, args, parameters=True))
    for name, p in model.named_parameters():
        in_vision = any(name.startswith(m + ".") for m in towers + projectors)
        if (in_vision and name not in trained and any(name.startswith(m + ".") for m in frozen)) or (
                args.freeze_language_model and not in_vision):
            p.requires_grad_(False)


def _decoder_layer_count(model: Any) -> int:
    count = getattr(text_config(model.config), "num_hidden_layers", None)  # an image-text model's language part
    if not isinstance(count, int):
        raise ConfigError(["finetuning.finetuning_type=freeze: the model config has no num_hidden_layers; "
                           "name the modules to train with finetuning.freeze_trainable_modules"])
    return count


def _freeze_trainable_names(model: Any, args: FinetuningArgs) -> list[str]:
    if args.freeze_trainable_modules:
        patterns = [re.escape(m) for m in args.freeze_trainable_modules]
        what = f"finetuning.freeze_trainable_modules={args.freeze_trainable_modules}"
    else:
        layers = _decoder_layer_count(model)
        keep = range(max(0, layers - args.freeze_trainable_layers), layers)
        patterns = [LAYER_NAME_PATTERN.format(index=i) for i in keep]
        what = f"finetuning.freeze_trainable_layers={args.freeze_trainable_layers}"
    names = [n for n, _ in model.named_parameters() if any(re.search(p, n) for p in patterns)
             and (args.freeze_trainable_modules or not any(f"{v}." in n for v in VISION_PARTS))]
    if not names:
        raise ConfigError([f"{what}: matches no parameter of this model (names look like "
                           f"{next(iter(dict(model.named_parameters())))!r})"])
    return names


def _freeze_all_but(model: Any, trainable: list[str]) -> None:
    wanted = set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
