"""The one place LoRA is merged into base weights: for good (serve's single adapter, export), or while generating
(eval, GRPO's sampling) and unmerged after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def merged(model: Any) -> Any:
    """A single adapter folded into the weights for good, the plain model back (one matmul per projection); a model
    without one, with several, or on a quantized base (merging would requantize it) comes back as it is."""
    from peft import PeftModel

    from peftkit.model.quantization import is_quantized

    if not isinstance(model, PeftModel) or len(model.peft_config) != 1 or is_quantized(model):
        return model
    return model.merge_and_unload()


@contextlib.contextmanager
def adapters_merged(model: Any) -> Iterator[None]:
    """LoRA folded into the base weights while generating, unfolded after (1.55x faster greedy decoding of
    SmolLM2-135M r16 all-linear, batch 50 on a 2-core CPU: each projection is one matmul instead of three).
    Unmerging leaves the weights equal to 1e-7 relative (float rounding), far below any check here.
    Models without LoRA layers, already merged, with several adapters loaded, on a quantized base (merging
    would requantize it) or with base weights in bf16 / fp16 (training's frozen weights on CUDA, or on a CPU inside
    train/precision.py's frozen_projections_in: unmerging in that precision would not give the weights back, and the
    rounding would add up over GRPO's steps) are left alone."""
    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peftkit.model.quantization import is_quantized

    # tuner layers only: a modules_to_save wrapper (an image-text run's vision tower trained in full) has
    # merged_adapters but no `merged`, and nothing to merge
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)] if isinstance(model, PeftModel) else []
    low = any(getattr(getattr(m, "base_layer", None), "weight", torch.empty(0)).dtype in (torch.bfloat16, torch.float16)
              for m in layers)
    merge = bool(layers) and not any(m.merged for m in layers) and len(model.peft_config) == 1 \
        and not is_quantized(model) and not low
    if merge:
        model.merge_adapter()
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if merge:
            model.unmerge_adapter()
