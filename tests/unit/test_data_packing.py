"""Packing: best-fit-decreasing rows, isolated records (loss and gradients equal one-by-one), streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftkit.config.schema import DataArgs
from peftkit.constants import IGNORE_INDEX
from peftkit.data import build_collator, prepare_data
from peftkit.data.packing import pack_bfd, pack_examples, unpack_row
from tests.helpers import REPO, assert_packed_equals_one_by_one, one_by_one


def test_best_fit_decreasing_bins() -> None:
    # 5 opens bin 0 (1 left); 3 opens bin 1; the next 3 fills bin 1 exactly; 2 opens bin 2 (4 left);
    # 1 goes to the fullest bin it fits: bin 0.
    assert pack_bfd([5, 3, 3, 2, 1], 6) == [[0, 4], [1, 2], [3]]
    assert pack_bfd([], 6) == []
    lengths = [7, 1, 4, 4, 2, 9, 3, 3, 5, 1]
    bins = pack_bfd(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(10))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # total 39 tokens: 4 rows is the minimum


def test_rows_restart_positions_and_never_predict_across_records() -> None:
    examples = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    (row,) = pack_examples(examples, 8)
    assert row["input_ids"] == [1, 2, 3, 4, 5]
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["labels"] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]  # token 4 is never predicted from token 3
    assert unpack_row(row) == [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]},
                               {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]}]


def test_packing_efficiency_on_alpaca_demo(tokenizer) -> None:
    data = prepare_data(DataArgs(train=str(REPO / "data/demo/alpaca_en_demo.json"), cutoff_len=1024, packing=True),
                        tokenizer)
    assert data.report.packing["efficiency"] > 0.95
    assert all(len(ids) <= 1024 for ids in data.train["input_ids"])
    assert sum(map(len, data.train["input_ids"])) == data.report.tokens  # every token kept


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_one_by_one(tiny_model_dir: Path, tokenizer, alpaca_file: Path, attn: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)
    data = prepare_data(DataArgs(train=str(alpaca_file), mask="all"), tokenizer)  # every token: the strictest case
    assert_packed_equals_one_by_one(model, tokenizer, data.train.to_list(), cutoff_len=128)


def test_a_forward_with_a_cache_lets_records_attend_to_each_other(tiny_model_dir: Path, tokenizer, alpaca_file: Path) -> None:
    """Why the collator sends use_cache=False: with a cache, transformers ignores the restarts."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = prepare_data(DataArgs(train=str(alpaca_file)), tokenizer).train.to_list()
    batch = build_collator(tokenizer, packing=True)(pack_examples(examples, 128))
    isolated = model(**batch).loss.item()
    leaky = model(**{**batch, "use_cache": True}).loss.item()
    assert abs(isolated - leaky) > 1e-4  # 20x the tolerance the isolated forward meets (random tiny model)
    assert isolated == pytest.approx(one_by_one(model, examples)[0], abs=1e-5)


def test_streaming_gives_the_same_examples_and_packs_on_the_fly(tokenizer, alpaca_file: Path) -> None:
    eager = prepare_data(DataArgs(train=str(alpaca_file)), tokenizer).train
    streamed = prepare_data(DataArgs(train=str(alpaca_file), streaming=True), tokenizer)
    assert [ex["input_ids"] for ex in streamed.train] == eager["input_ids"]
    assert streamed.report.streaming and "[[Hello!<|im_end|>\n]]" in streamed.report.example
    packed = list(prepare_data(DataArgs(train=str(alpaca_file), streaming=True, packing=True, cutoff_len=128), tokenizer).train)
    assert len(packed) < len(eager)
    assert sorted(len(ex["input_ids"]) for row in packed for ex in unpack_row(row)) == sorted(map(len, eager["input_ids"]))


def test_fixed_shape_batches_for_torch_compile(tokenizer) -> None:
    rows = pack_examples([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}], 4)
    batch = build_collator(tokenizer, packing=True, fixed_shape=(3, 8))(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, 8)
    assert (batch["labels"][len(rows):] == IGNORE_INDEX).all()  # the added rows are padding only
    assert batch["position_ids"][2].tolist() == list(range(8))
