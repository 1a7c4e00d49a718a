"""Mixed precision without duplicate copies: under autocast, each activation is cast down once, not once per use.

Autocast casts a matmul's float32 input to bfloat16 inside every matmul, and autograd keeps each
cast for the backward pass. A decoder layer's normalised hidden states feed q, k, v (and gate, up)
and each LoRA adapter beside them, so the same activation was stored five times in bfloat16; and
peft casts the input of every LoRA adapter back up to the adapter's float32 first, a sixth copy.
Here the norm's output is cast once (what every consumer would have cast it to: the forward is
bit-identical) and peft's up-cast is turned off (autocast still runs the adapter's matmul in
bfloat16). Measured on the 2-core CPU, SmolLM2-135M, 8 x 512 packed tokens: peak RSS 6.8 -> 5.7 GB,
same loss. The gradients sum over those consumers in bfloat16 instead of float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peftkit.model.families import PRE_NORM_MODELS, PRE_NORM_NORMS


def _cast_to_autocast_dtype(module: Any, inputs: Any, output: Any) -> Any:
    import torch

    device = output.device.type
    if torch.is_autocast_enabled(device):
        return output.to(torch.get_autocast_dtype(device))
    return None


@contextmanager
def one_cast_per_activation(model: Any) -> Iterator[None]:
    """Inside, autocast forwards of `model` keep one low-precision copy of each normalised activation."""
    handles = []
    adapters = {m: getattr(m, "cast_input_dtype_enabled", True) for m in model.modules() if hasattr(m, "lora_A")}
    for m in adapters:
        m.cast_input_dtype_enabled = False
    if getattr(getattr(model, "config", None), "model_type", None) in PRE_NORM_MODELS:
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in PRE_NORM_NORMS:
                handles.append(module.register_forward_hook(_cast_to_autocast_dtype))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, enabled in adapters.items():
            m.cast_input_dtype_enabled = enabled


@contextmanager
def frozen_projections_in(model: Any, dtype: Any) -> Iterator[int]:
    """Inside, the frozen nn.Linear weights are stored in `dtype` (autocast's), the float32 originals back after.

    Autocast casts every float32 weight to bfloat16 again in every forward (2,456 casts, 15% of a demo step on the
    CPU, benchmarks/RESULTS.md); stored once in bfloat16, each matmul takes the same bfloat16 values, so forward and
    gradients are bit-identical. The output layer (tied to the embeddings on many models: their lookup would turn
    bfloat16) and any weight that trains keep float32. Yields how many weights it stored."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    originals = []
    for module in model.modules():
        if type(module) is torch.nn.Linear and module is not head and not module.weight.requires_grad \
                and module.weight.dtype == torch.float32:
            originals.append((module.weight, module.weight.data))
            module.weight.data = module.weight.data.to(dtype)
    try:
        yield len(originals)
    finally:
        for weight, data in originals:
            weight.data = data
