"""Load a tokenizer and a causal LM from a resolved name, with errors that say what to do."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from peftkit.config.schema import ModelArgs
from peftkit.constants import DATA_REPORT_FILE
from peftkit.errors import ConfigError, ModelError
from peftkit.model.attention import VARLEN, register_varlen
from peftkit.model.heads import Head
from peftkit.model.resolve import resolve_model

logger = logging.getLogger("peftkit")


def _from_pretrained(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(name, **kwargs)
    except ImportError as e:  # a quantized checkpoint (GPTQ, AWQ, ...) or quantization_bit without its library
        raise ModelError(f"model.name_or_path={name!r}: loading the {what} needs a package that is not installed: "
                         f"{str(e).splitlines()[0]}") from e
    except (OSError, ValueError) as e:  # transformers raises both for missing or unreadable checkpoints
        if Path(name).exists():
            raise ModelError(f"model.name_or_path={name!r}: could not load the {what} from this folder: {e}") from e
        raise ModelError(
            f"model.name_or_path={name!r}: not a local folder, and loading it as a hub id failed "
            f"(this machine may have no internet). Give a local folder holding config.json and weights, "
            f"or `smollm2-135m-instruct` for the embedded model. Cause: {str(e).splitlines()[0]}"
        ) from e


def load_model_config(args: ModelArgs) -> Any:
    """The model's transformers config alone (no weights): what the family table reads before any work."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, resolve_model(args.name_or_path), "config",
                            trust_remote_code=args.trust_remote_code)


def check_family(args: ModelArgs, packing: bool) -> None:
    """What this model's family cannot do with the run as configured, refused before any work (exit 2)."""
    from peftkit.model.families import packing_refusal

    refusal = packing_refusal(load_model_config(args)) if packing else None
    if refusal:
        raise ConfigError([refusal])


def load_tokenizer(args: ModelArgs, padding_side: str = "right") -> Any:
    """The model's tokenizer; a missing pad token becomes the EOS token (labels, not pad ids, mark padding)."""
    from transformers import AutoTokenizer

    path = resolve_model(args.name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer", trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_processor(args: ModelArgs) -> Any | None:
    """An image-text model's processor (its tokenizer, image processor and chat template), or None: a text model, or
    an image-text checkpoint without image-processor files (it then trains and answers on text only)."""
    from peftkit.model.families import is_image_text

    try:
        config = load_model_config(args)
    except ModelError:  # a tokenizer-only folder (`peftkit data`): no model to have images
        return None
    if not is_image_text(config):
        return None
    from transformers import AutoProcessor

    path = resolve_model(args.name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (ImportError, AttributeError) as e:  # Qwen-VL's and SmolVLM's video processor: torchvision only
        raise ModelError(f"model.name_or_path={args.name_or_path!r}: its processor cannot be built here: "
                         f"{str(e).splitlines()[0][:200]}. transformers builds this family's video processor with "
                         "torchvision: install the torchvision release that matches your torch") from e
    except (OSError, ValueError, TypeError) as e:  # no processor files: the folder has a tokenizer only
        logger.info("%s: no image processor (%s); images cannot be used", path, str(e).splitlines()[0][:200])
        return None
    return processor if has_images(processor) else None


def has_images(processor: Any) -> bool:
    """Whether a loaded processor reads images (an image-text model's), not a bare tokenizer."""
    return processor is not None and getattr(processor, "image_processor", None) is not None


def load_model(args: ModelArgs, head: Head | None = None, classes: list[str] | None = None,
               pad_token_id: int | None = None, **from_pretrained: Any) -> Any:
    """The model of `head` (default: the causal LM's own) in the configured dtype and attention implementation.

    A classifier head (stage cls) has `classes`' labels; a decoder reads its score at the last non-padding token, so
    it needs `pad_token_id`. A value head is not attached here (load_stage_model does, or the run's is restored).
    `from_pretrained` overrides the keywords given to it (export's float64 load).
    """
    import torch

    from peftkit.model.heads import HEADS

    path = resolve_model(args.name_or_path)
    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    kwargs["dtype"] = "auto" if args.dtype == "auto" else getattr(torch, args.dtype or "float32")
    if args.attn_implementation:
        if args.attn_implementation == VARLEN:
            register_varlen()
        kwargs["attn_implementation"] = args.attn_implementation
    if args.quantization_bit is not None:
        from peftkit.model.quantization import bnb_config

        kwargs["quantization_config"] = bnb_config(args)
    from peftkit.model.quantization import keep_unpacked_4bit

    kwargs |= from_pretrained

    head = head or HEADS["lm"]
    try:
        config = load_model_config(args)
    except ModelError:  # from_pretrained below says what is wrong with the folder
        config = None
    model = _from_pretrained(head.auto_class(config), path, "model", **head.config_kwargs(classes), **kwargs)
    if head.classes and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    keep_unpacked_4bit(model)  # bnb-quantized bases (quantization_bit or a pre-quantized bnb checkpoint)
    return model


def load_stage_model(args: ModelArgs, stage: str, classes: list[str] | None = None,
                     pad_token_id: int | None = None) -> Any:
    """The model with the stage's head (model/heads.py): the causal LM; with a fresh value head
    (seeded by the caller's seed: it is what training starts from and what is scored before training);
    or a sequence classifier over the training data's `classes`."""
    from peftkit.model.heads import head_of

    head = head_of(stage)
    return head.attach(load_model(args, head, classes, pad_token_id))


def load_trained(args: ModelArgs, run: Path, stage: str, adapter: bool, pad_token_id: int | None = None,
                 restore_head: bool = True, **from_pretrained: Any) -> Any:
    """The one loader of a trained run (chat, eval, serve, export): the model `args` names with the stage's head as
    the run in `run` trained it (a classifier's classes, rm's value head) and, with `adapter`, the run's LoRA adapter
    on it, unmerged (infer/merging.py merges). Export passes `restore_head=False`: it carries the head's files."""
    from peftkit.model.heads import head_of

    head = head_of(stage)
    model = load_model(args, head, saved_classes(run) if head.classes else None, pad_token_id, **from_pretrained)
    if restore_head:
        head.restore(model, run)  # before the adapter, whose config excludes a value head from LoRA's targets
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run))
    return model


def saved_classes(trained: Path) -> list[str]:
    """The class names of a cls run: its data_report.json (beside a checkpoint, or one folder up), else config.json."""
    for folder in (trained, trained.parent):
        report = folder / DATA_REPORT_FILE
        if report.is_file():
            classes = json.loads(report.read_text(encoding="utf-8")).get("classes")
            if classes:
                return classes
    config = trained / "config.json"
    if config.is_file():
        id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
        if id2label:
            return [id2label[str(i)] for i in range(len(id2label))]
    raise ModelError(f"{trained}: no data_report.json or config.json with the classes — is it the output_dir of a "
                     "`stage: cls` run?")
