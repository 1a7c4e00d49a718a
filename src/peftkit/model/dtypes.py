"""The one mixed-precision rule for training and generation: train.bf16 / train.fp16 → an autocast dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any


def autocast_dtype(train: Mapping[str, Any]) -> str | None:
    """The autocast dtype the `train` section asks for (bf16: auto is resolved when the config loads); None: fp32."""
    if train.get("bf16"):
        return "bfloat16"
    if train.get("fp16"):
        return "float16"
    return None


def autocast(device_type: str, dtype: str | None) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype` on the device, or nothing for None (the weights' own dtype)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype))


def training_dtype(model_dtype: str | None, train: Mapping[str, Any], on_cuda: bool) -> str | None:
    """The weight dtype a training run loads: model.dtype as set; unset, float32, except mixed precision on CUDA,
    where the frozen weights load in the autocast dtype (half the memory, no per-step cast) as LLaMA-Factory and
    TRL users expect; upcast_trainable then keeps the trained ones in float32."""
    if model_dtype is not None or not on_cuda:
        return model_dtype
    return autocast_dtype(train)


def upcast_trainable(model: Any) -> int:
    """Trainable parameters in float32 (the optimizer's master weights); returns how many were cast."""
    import torch

    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            cast += 1
    return cast
