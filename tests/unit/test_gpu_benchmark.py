"""benchmarks/gpu_speed.py's arithmetic: the FLOP formula counts exactly the model's matrix products."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers import REPO


def _gpu_speed():
    spec = importlib.util.spec_from_file_location("gpu_speed", REPO / "benchmarks/gpu_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("arch", "published"), [("qwen2.5-1.5b", 1.54e9), ("llama-3.2-1b", 1.24e9),
                                                 ("smollm2-135m", 1.35e8)])
def test_flops_per_token_is_six_times_the_matmul_parameters_plus_attention(arch: str, published: float) -> None:
    """With tied embeddings the published parameter count is (nearly) the matrix products' (norms are tiny)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gpu_speed = _gpu_speed()
    kind, fields = gpu_speed.ARCHS[arch]
    config = AutoConfig.for_model(kind, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # lm_head included
    attention = 12 * config.num_hidden_layers * config.hidden_size * 100
    assert gpu_speed.flops_per_token(config, 100) == 6 * matmul + attention
    assert matmul == pytest.approx(published, rel=0.02)  # the configs are the published models
