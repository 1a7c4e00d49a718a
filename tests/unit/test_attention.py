"""The attention path of packed training (model/attention.py): flattened rows, torch_varlen, the automatic choice.

torch's varlen kernel runs only on CUDA; here a stand-in with its signature (per-sequence sdpa) runs behind
the same plumbing, so what is tested is everything peftkit adds: boundaries, GQA, scale, padding masks,
the cache path and the trainer's wiring. The kernel itself is tested in tests/gpu.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.config import load_config
from peftkit.config.schema import DataArgs
from peftkit.constants import IGNORE_INDEX
from peftkit.data import build_collator, prepare_data
from peftkit.data.packing import pack_examples
from peftkit.model import attention
from peftkit.model.dtypes import training_dtype, upcast_trainable
from peftkit.train.run import train
from tests.helpers import assert_packed_equals_one_by_one, one_by_one, tiny_run

calls: list[dict] = []


def cpu_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
               enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's signature (torch 2.13), computed per sequence with sdpa."""
    assert window_size[1] == 0 and torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    assert enable_gqa == (key.shape[1] != query.shape[1])
    calls.append({"sequences": len(cu_seq_q) - 1, "tokens": query.shape[0]})
    window = None if window_size[0] < 0 else window_size[0]
    return attention.reference_varlen_attn(query, key, value, cu_seq_q, max_q, scale, window)


@pytest.fixture
def varlen_on_cpu(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    monkeypatch.setattr(attention, "varlen_kernel", lambda: cpu_varlen)
    attention.register_varlen()
    calls.clear()
    return calls


def _model(tiny_model_dir: Path, attn: str):
    from transformers import AutoModelForCausalLM

    if attn == attention.VARLEN:
        attention.register_varlen()
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)


def test_flattened_rows_have_no_padding_and_the_boundaries_flash_reads(tokenizer) -> None:
    rows = pack_examples([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
                          {"input_ids": [6, 7, 8], "labels": [6, 7, 8]}], 5)
    batch = build_collator(tokenizer, packing=True, flatten=True)(rows)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3], [6, 7, 8, 4, 5]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 6, 7, 8, 4, 5]]  # both rows, no padding
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 7, 8, IGNORE_INDEX, 5]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 6, 8] and batch["max_length_q"] == 3
    fixed = build_collator(tokenizer, packing=True, fixed_shape=(3, 5), flatten=True)(rows)
    assert fixed["input_ids"].shape == (1, 15)  # rows x length, for torch.compile
    assert fixed["position_ids"][0, 8:].tolist() == [0, 1, 2, 3, 4, 0, 1]  # padding records of at most 5 tokens
    assert (fixed["labels"][0, 8:] == IGNORE_INDEX).all() and fixed["cu_seq_lens_q"].tolist() == [0, 3, 6, 8, 13, 15]


@pytest.mark.parametrize("attn", ["sdpa", attention.VARLEN])
def test_a_flattened_row_gives_the_loss_and_gradients_of_one_by_one(tiny_model_dir: Path, tokenizer, alpaca_file: Path,
                                                                    attn: str, varlen_on_cpu: list[dict]) -> None:
    model = _model(tiny_model_dir, attn)
    examples = prepare_data(DataArgs(train=str(alpaca_file), mask="all"), tokenizer).train.to_list()
    assert_packed_equals_one_by_one(model, tokenizer, examples, cutoff_len=128, flatten=True)
    if attn == attention.VARLEN:  # each layer ran every record as its own sequence, in one call
        assert {c["sequences"] for c in varlen_on_cpu} >= {len(examples)}


def test_varlen_without_boundaries_would_mix_records_and_the_check_sees_it(tiny_model_dir: Path, tokenizer,
                                                                            alpaca_file: Path, varlen_on_cpu) -> None:
    """The isolation check can fail: the same row with positions that do not restart is one long sequence."""
    model = _model(tiny_model_dir, attention.VARLEN)
    examples = prepare_data(DataArgs(train=str(alpaca_file), mask="all"), tokenizer).train.to_list()
    batch = build_collator(tokenizer, packing=True, flatten=True)(pack_examples(examples, 128))
    n = batch["input_ids"].shape[1]
    leaky = {**{k: v for k, v in batch.items() if not k.startswith(("cu_seq", "max_length"))},
             "position_ids": torch.arange(n)[None]}
    with torch.no_grad():
        mixed = model(**leaky).loss.item()
    assert abs(mixed - one_by_one(model, examples)[0]) > 1e-3


def test_varlen_with_a_padding_mask_and_with_a_cache_equals_sdpa(tiny_model_dir: Path, varlen_on_cpu) -> None:
    sdpa, varlen = _model(tiny_model_dir, "sdpa"), _model(tiny_model_dir, attention.VARLEN)
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [11, 12, 13, 14, 15, 16, 17]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7])
    with torch.no_grad():
        want, got = (m(input_ids=ids, attention_mask=mask).logits for m in (sdpa, varlen))
    torch.testing.assert_close(got[0, :5], want[0, :5], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)
    left = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # generation: left padding, then a KV cache
    left_mask = (left != 0).long()
    outs = [m.generate(input_ids=left, attention_mask=left_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
            for m in (sdpa, varlen)]
    assert outs[0].tolist() == outs[1].tolist()


def test_training_with_torch_varlen_flattens_rows_and_logs_the_sdpa_losses(tiny_model_dir: Path, alpaca_file: Path,
                                                                         tmp_path: Path, varlen_on_cpu) -> None:
    losses = {}
    for attn in ("sdpa", attention.VARLEN):
        out = tmp_path / attn
        result = train(load_config(None, tiny_run(tiny_model_dir, out, "data.packing=true",
                                                  f"model.attn_implementation={attn}", data=alpaca_file, seed=0)))
        rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        losses[attn] = [r["loss"] for r in rows if r["event"] == "log"]
        assert result.model.config._attn_implementation == attn
    assert varlen_on_cpu  # the varlen path ran
    assert losses[attention.VARLEN] == pytest.approx(losses["sdpa"], abs=1e-4)


def test_the_automatic_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.utils

    assert attention.choose_attention("eager", packing=True, on_cuda=True) == "eager"  # model.attn_implementation wins
    assert attention.choose_attention(None, packing=True, on_cuda=False) is None  # CPU: sdpa rows
    assert attention.choose_attention(None, packing=False, on_cuda=True) is None  # nothing to flatten
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert attention.choose_attention(None, packing=True, on_cuda=True) == "flash_attention_2"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    monkeypatch.setattr(attention, "varlen_kernel", lambda: cpu_varlen)
    monkeypatch.setattr(attention, "_self_check", {})
    assert attention.varlen_works("cpu") is True  # the stand-in passes the check the kernel must pass on CUDA
    monkeypatch.setattr(attention, "varlen_works", lambda device="cuda": True)
    assert attention.choose_attention(None, packing=True, on_cuda=True) == attention.VARLEN
    monkeypatch.setattr(attention, "varlen_works", lambda device="cuda": False)  # a kernel that fails its check
    assert attention.choose_attention(None, packing=True, on_cuda=True) is None
    assert [attention.flattens(a) for a in ("sdpa", "eager", None, attention.VARLEN, "flash_attention_2")] == \
        [False, False, False, True, True]


def test_a_wrong_kernel_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def leaky(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
              enable_gqa=False):  # ignores the boundaries: one sequence
        whole = torch.tensor([0, query.shape[0]], dtype=torch.int32)
        return attention.reference_varlen_attn(query, key, value, whole, query.shape[0], scale)

    monkeypatch.setattr(attention, "varlen_kernel", lambda: leaky)
    monkeypatch.setattr(attention, "_self_check", {})
    assert attention.varlen_works("cpu") is False


def test_half_precision_frozen_weights_only_where_asked_and_on_cuda(tiny_model_dir: Path) -> None:
    assert training_dtype(None, {"bf16": True}, on_cuda=True) == "bfloat16"
    assert training_dtype(None, {"fp16": True}, on_cuda=True) == "float16"
    assert training_dtype(None, {"bf16": True}, on_cuda=False) is None  # CPU: float32 weights, bf16 autocast
    assert training_dtype("float32", {"bf16": True}, on_cuda=True) == "float32"  # model.dtype as set
    assert training_dtype(None, {}, on_cuda=True) is None
    model = _model(tiny_model_dir, "sdpa").to(torch.bfloat16)
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    assert upcast_trainable(model) == 1
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_kernel_error_names_the_way_out(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftkit.errors import ModelError

    def refuses(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                enable_gqa=False):
        raise RuntimeError("FlashAttention only supports head dimension at most 256\nmore")

    monkeypatch.setattr(attention, "varlen_kernel", lambda: refuses)
    model = _model(tiny_model_dir, attention.VARLEN)
    with pytest.raises(ModelError, match="head dimension at most 256.*model.attn_implementation: sdpa"):
        model(input_ids=torch.tensor([[5, 6, 7]]))
