"""LoRA's update added into the base layer's output in place, in one matrix product.

peft computes `result + lora_B(lora_A(x)) * scaling`: for an MLP projection of 8 x 512 tokens that
is three more passes over a 25 MB output (B's product, the scaling, the sum), each a fresh tensor.
Here B's product is accumulated straight into the base output (`addmm_`, scaled on the way; under
autocast a product and an in-place add, as bf16 `addmm_` is slow on CPU). The base output is not
kept for the backward pass of a plain Linear, so updating it in place is safe, and the result is
the same sum. Measured on the 2-core CPU, SmolLM2-135M, fp32, 8 x 512 packed tokens: peak RSS
12.4 -> 9.1 GB over 5 steps (10.4 -> 8.3 GB in benchmarks/train_speed.py), speed within the noise
(steady steps 20.5 -> 17.7 s in one run, whole runs 189 vs 187-195 tokens/s). Anything else
(merged or disabled adapters, several adapters, DoRA and other variants, biases, quantised base
layers) runs peft's own forward.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _plain(layer: Any) -> bool:
    """A peft LoRA Linear over an nn.Linear with one active, unmerged, vanilla adapter."""
    import torch
    from peft.tuners.lora.layer import Linear

    if type(layer) is not Linear or type(layer.base_layer) is not torch.nn.Linear:
        return False
    names = layer.active_adapters
    return (len(names) == 1 and names[0] in layer.lora_A and names[0] not in layer.lora_variant
            and not layer.merged and not layer.disable_adapters and layer.lora_B[names[0]].bias is None)


def _fused_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch

    autocast = torch.is_autocast_enabled(x.device.type)
    if args or kwargs or not _plain(self) or not (autocast or _all_float32(self, x)):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]  # the only one (_plain)
    result = self.base_layer(x)
    down = self.lora_A[name](self.lora_dropout[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype)))
    out, down = result.view(-1, result.shape[-1]), down.view(-1, down.shape[-1])
    up = self.lora_B[name].weight.to(out.dtype).T
    if autocast:
        out.add_(down.to(out.dtype) @ up, alpha=self.scaling[name])
    else:
        out.addmm_(down, up, alpha=self.scaling[name])
    return result


def _all_float32(layer: Any, x: Any) -> bool:
    import torch

    name = layer.active_adapters[0]
    return all(t.dtype == torch.float32 for t in (x, layer.base_layer.weight, layer.lora_A[name].weight,
                                                   layer.lora_B[name].weight))


@contextmanager
def fused_lora_forward(model: Any) -> Iterator[int]:
    """Inside, the plain LoRA layers of `model` use the fused forward; yields how many."""
    layers = [m for m in model.modules() if _plain(m)]
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
