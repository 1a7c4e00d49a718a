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
