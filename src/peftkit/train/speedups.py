"""`train.peftkit_speedups`: the patches of peft / transformers internals that make training leaner, behind one switch.

auto (default): on for the library versions they were written and tested against, each only where
it applies and was measured to help; outside those versions one warning, and the plain path. The
fused LoRA and the one cast were measured on the CPU only, so on CUDA auto leaves them off (`on`
turns them on anywhere, for benchmarks/gpu_speed.py to measure). off: transformers' and peft's own
code only. What each changes:

- fused LoRA (train/fused_lora.py): LoRA's update added into the projection's output in place. Same
  sum, different order of float additions (equal to 1e-6 in tests/unit/test_fused_lora.py); not under torch.compile;
  only over plain nn.Linear bases (a quantized layer keeps peft's own forward).
- one cast per activation (train/precision.py, bf16 / fp16 only, not on a quantized base): the normalised
  activation is cast once for all its consumers, and peft's up-cast of LoRA inputs is off. The forward is bit-identical;
  the gradient reaching the norm sums its consumers' contributions in bf16 instead of float32.
- frozen weights stored once in bf16 (train/precision.py, CPU with bf16 autocast, not on a quantized base): the
  frozen projections' float32 weights are kept in bf16 while training runs (the originals back after), instead of
  autocast casting each again in every forward. Bit-identical: each matmul takes the same bf16 values.
- chunked loss (train/loss.py, `train.chunked_loss` unset): the output layer is skipped in the forward
  and the cross-entropy runs over supervised positions a chunk at a time. Same value and gradients to
  1e-5 (tests/unit/test_chunked_loss.py). An explicit `train.chunked_loss: true` is honoured either way.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

from peftkit.libraries import warn_untested
from peftkit.train.fused_lora import fused_lora_forward
from peftkit.train.precision import frozen_projections_in, one_cast_per_activation

logger = logging.getLogger("peftkit")

def speedups_enabled(mode: str) -> bool:
    """Whether `train.peftkit_speedups` (auto | on | off) turns the patches on here: not outside the library versions
    they were written against (libraries.py: TESTED_VERSIONS; one warning, then the libraries' own code)."""
    if mode == "off":
        return False
    return not warn_untested("train.peftkit_speedups: off", ("peft", "transformers"),
                             "; training runs the libraries' own code")


def training_speedups(model: Any, mode: str, autocast: str | None, compiled: bool) -> ExitStack:
    """What PeftTrainer.train runs inside (`autocast`: its dtype, None for float32); the model is back as it was after."""
    stack = ExitStack()
    if not speedups_enabled(mode):
        return stack
    on_cpu = next(model.parameters()).device.type == "cpu"
    if mode == "auto" and not on_cpu:  # measured on the CPU only (see the module docstring)
        return stack
    if not compiled:
        stack.enter_context(fused_lora_forward(model))
    from peftkit.model.quantization import is_quantized

    if autocast and not is_quantized(model):  # bitsandbytes layers cast their input themselves
        stack.enter_context(one_cast_per_activation(model))
        if on_cpu and autocast == "bfloat16":
            import torch

            stack.enter_context(frozen_projections_in(model, torch.bfloat16))
    return stack
