"""The fused LoRA forward gives peft's outputs and gradients, and steps aside where it does not apply."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from peftkit.config.schema import DataArgs, FinetuningArgs
from peftkit.data import build_collator, prepare_data
from peftkit.data.packing import pack_examples
from peftkit.model import prepare_for_training
from peftkit.train.fused_lora import fused_lora_forward


def _lora_model(tiny_model_dir: Path, **lora: object):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = prepare_for_training(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                 FinetuningArgs(finetuning_type="lora", lora_rank=4, **lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the update a value, so the test sees it
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    return model


def _run(model, batch, fused: bool, bf16: bool = False):
    model.zero_grad()
    with fused_lora_forward(model) if fused else nullcontext(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture()
def batch(tokenizer, alpaca_file: Path):
    examples = prepare_data(DataArgs(train=str(alpaca_file)), tokenizer).train.to_list()
    return build_collator(tokenizer, packing=True)(pack_examples(examples, 128))


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_forward_equals_peft(tiny_model_dir: Path, batch, bf16: bool) -> None:
    model = _lora_model(tiny_model_dir)
    loss, grads = _run(model, batch, fused=False, bf16=bf16)
    with fused_lora_forward(model) as n:
        assert n == 7 * model.config.num_hidden_layers  # every projection of every layer
    fused_loss, fused_grads = _run(model, batch, fused=True, bf16=bf16)
    tol = {"atol": 1e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-6, "rtol": 1e-5}
    assert fused_loss == pytest.approx(loss, abs=tol["atol"])
    assert grads.keys() == fused_grads.keys() and any("lora_B" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, **tol, msg=name)
    assert not any("forward" in vars(m) for m in model.modules())  # back to peft's forward
    assert _run(model, batch, fused=False, bf16=bf16)[0] == loss


def test_fused_forward_steps_aside_for_dora_and_disabled_adapters(tiny_model_dir: Path, batch) -> None:
    with fused_lora_forward(_lora_model(tiny_model_dir, use_dora=True)) as n:
        assert n == 0
    model = _lora_model(tiny_model_dir)
    with model.disable_adapter():
        base_loss = model(**batch).loss.item()
        with fused_lora_forward(model):
            assert model(**batch).loss.item() == base_loss  # the disabled adapter adds nothing
    with fused_lora_forward(model), torch.no_grad():
        model.merge_adapter()  # merged: the update is in the weight, not added again
        merged = model(**batch).loss.item()
        model.unmerge_adapter()
        assert model(**batch).loss.item() == pytest.approx(merged, abs=1e-5)
