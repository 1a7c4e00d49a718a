"""The gpu tier: what only a CUDA device can show. Skipped, with that reason, where there is none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.config import load_config
from peftkit.train.run import train
from tests.helpers import tiny_run


@pytest.mark.parametrize("speedups", ["auto", "off"])
def test_bf16_lora_training_on_cuda_logs_finite_losses_and_counts(speedups: str, wide_model_dir: Path,
                                                                  alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / speedups
    result = train(load_config(None, tiny_run(wide_model_dir, out, "train.bf16=true", "data.packing=true",
                                              f"train.peftkit_speedups={speedups}", data=alpaca_file, max_steps=3)))
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    logs = [r for r in rows if r["event"] == "log"]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert all(r["real_tokens_seen"] >= r["supervised_tokens_seen"] > 0 for r in logs)
    assert next(result.model.parameters()).device.type == "cuda"


def test_speedups_change_the_first_loss_by_rounding_only(wide_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    first = {}
    for speedups in ("auto", "off"):
        out = tmp_path / speedups
        train(load_config(None, tiny_run(wide_model_dir, out, "train.bf16=true", f"train.peftkit_speedups={speedups}",
                                         data=alpaca_file, max_steps=1, seed=0)))
        rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        first[speedups] = next(r["loss"] for r in rows if r["event"] == "log")
    assert first["auto"] == pytest.approx(first["off"], rel=1e-2)  # bf16 rounding, not a different loss


def _log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def _cuda_model(wide_model_dir: Path, attn: str, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    from peftkit.model.attention import VARLEN, register_varlen

    if attn == VARLEN:
        register_varlen()
    return AutoModelForCausalLM.from_pretrained(wide_model_dir, attn_implementation=attn, dtype=dtype).cuda()


ATTENTIONS = ["sdpa", "torch_varlen", "flex_attention"]


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("flatten", [False, True])
def test_packed_loss_and_gradients_equal_one_by_one_on_cuda(attn: str, flatten: bool, wide_model_dir: Path, tokenizer,
                                                            alpaca_file: Path) -> None:
    """Isolation on the GPU, in bf16 weights: loss to 1e-2 relative, gradients to 5e-2 (atol / rtol): bf16's
    8 bits of mantissa over sums in different orders; a leak between records moves the loss far more (next test)."""
    from peftkit.config.schema import DataArgs
    from peftkit.data import prepare_data
    from peftkit.model.attention import varlen_kernel
    from tests.helpers import assert_packed_equals_one_by_one

    if attn == "torch_varlen" and varlen_kernel() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    model = _cuda_model(wide_model_dir, attn)
    examples = prepare_data(DataArgs(train=str(alpaca_file), mask="all"), tokenizer).train.to_list()
    assert_packed_equals_one_by_one(model, tokenizer, examples, cutoff_len=128, flatten=flatten,
                                    tolerance=(5e-2, 1e-2))


@pytest.mark.parametrize("attn", ["torch_varlen", "flex_attention"])
def test_a_leak_between_records_is_larger_than_the_tolerance_on_cuda(attn: str, wide_model_dir: Path, tokenizer,
                                                                     alpaca_file: Path) -> None:
    from peftkit.config.schema import DataArgs
    from peftkit.data import build_collator, prepare_data
    from peftkit.data.packing import pack_examples
    from tests.helpers import one_by_one

    model = _cuda_model(wide_model_dir, attn)
    examples = prepare_data(DataArgs(train=str(alpaca_file), mask="all"), tokenizer).train.to_list()
    batch = build_collator(tokenizer, packing=True, flatten=True)(pack_examples(examples, 128))
    n = batch["input_ids"].shape[1]
    leaky = {"input_ids": batch["input_ids"].cuda(), "labels": batch["labels"].cuda(),
             "position_ids": torch.arange(n, device="cuda")[None], "use_cache": False}
    with torch.no_grad():
        mixed = model(**leaky).loss.item()
    reference = one_by_one(model, examples)[0]
    assert abs(mixed - reference) > 1e-2 * reference


def test_varlen_passes_its_check_and_is_the_automatic_choice_on_cuda() -> None:
    from peftkit.model.attention import VARLEN, choose_attention, varlen_kernel, varlen_works

    if varlen_kernel() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    assert varlen_works("cuda")
    assert choose_attention(None, packing=True, on_cuda=True) in (VARLEN, "flash_attention_2")


def test_bf16_on_cuda_trains_bf16_frozen_weights_with_fp32_lora_and_flattened_rows(wide_model_dir: Path,
                                                                                  alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(load_config(None, tiny_run(wide_model_dir, out, "train.bf16=true", "data.packing=true",
                                              data=alpaca_file, max_steps=3)))
    model = result.model
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    rows = _log_rows(out)
    logs = [r for r in rows if r["event"] == "log"]
    assert logs and all(r["peak_reserved_mb"] >= r["peak_memory_mb"] > 0 for r in logs)
    # one flattened row per step: fed tokens equal real tokens (no padding at all)
    assert model.config._attn_implementation in ("torch_varlen", "flash_attention_2", "sdpa")
    if model.config._attn_implementation != "sdpa":
        assert logs[-1]["tokens_seen"] == logs[-1]["real_tokens_seen"]


def test_gradient_checkpointing_and_compile_keep_the_first_loss_on_cuda(wide_model_dir: Path, alpaca_file: Path,
                                                                       tmp_path: Path) -> None:
    """Non-reentrant checkpointing with LoRA, and torch.compile: the same first loss as the plain path (bf16)."""
    first = {}
    for name, extra in (("plain", []), ("gc", ["train.gradient_checkpointing=true"]),
                        ("compile", ["train.torch_compile=true"])):
        out = tmp_path / name
        train(load_config(None, tiny_run(wide_model_dir, out, "train.bf16=true", "data.packing=true", *extra,
                                         data=alpaca_file, max_steps=2, seed=0)))
        first[name] = next(r["loss"] for r in _log_rows(out) if r["event"] == "log")
    assert first["gc"] == pytest.approx(first["plain"], rel=1e-2)
    assert first["compile"] == pytest.approx(first["plain"], rel=2e-2)


def test_liger_kernel_keeps_the_first_loss_on_cuda(wide_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (benchmarks/gpu_check.sh brings it)")
    first = {}
    for name, extra in (("plain", []), ("liger", ["train.use_liger_kernel=true"])):
        out = tmp_path / name
        train(load_config(None, tiny_run(wide_model_dir, out, "train.bf16=true", "data.packing=true", *extra,
                                         data=alpaca_file, max_steps=1, seed=0)))
        first[name] = next(r["loss"] for r in _log_rows(out) if r["event"] == "log")
    assert first["liger"] == pytest.approx(first["plain"], rel=1e-2)
