"""The chunked loss equals transformers' loss and gradients; training with it equals training without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.config import load_config
from peftkit.config.schema import DataArgs, FinetuningArgs
from peftkit.data import build_collator, prepare_data
from peftkit.data.packing import pack_examples
from peftkit.model import prepare_for_training
from peftkit.model.value_head import hidden_states_as_logits
from peftkit.train.loss import chunked_causal_lm_loss
from peftkit.train.run import train


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("packed", "ft"), [(False, "lora"), (True, "lora"), (True, "full")])
def test_chunked_loss_and_gradients_equal_the_standard_loss(tiny_model_dir: Path, tokenizer, alpaca_file: Path,
                                                            packed: bool, ft: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = prepare_for_training(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                 FinetuningArgs(finetuning_type=ft, lora_rank=4))
    examples = prepare_data(DataArgs(train=str(alpaca_file)), tokenizer).train.to_list()
    rows = pack_examples(examples, 128) if packed else examples
    batch = build_collator(tokenizer, packing=packed)(rows)
    if not packed:
        batch = dict(batch)

    model.zero_grad()
    standard = model(**batch).loss
    standard.backward()
    expected = _grads(model)

    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    causal_lm = model.get_base_model() if ft == "lora" else model
    with hidden_states_as_logits(causal_lm) as head:
        hidden = model(**inputs).logits
    assert hidden.shape[-1] == model.config.hidden_size  # no vocabulary-sized tensor was made
    total, count = chunked_causal_lm_loss(hidden, batch["labels"], head, chunk=7)  # many chunks
    (total / count).backward()
    assert (total / count).item() == pytest.approx(standard.item(), abs=1e-5)
    got = _grads(model)
    assert expected.keys() == got.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    if ft == "full":
        assert any("lm_head" in name for name in got)  # the output layer's own gradient is exact too
    assert causal_lm.get_output_embeddings()(torch.zeros(1, model.config.hidden_size)).shape[-1] == len(tokenizer)


def test_training_with_and_without_chunked_loss_logs_the_same_losses(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import peftkit.train.trainer as trainer_module

    calls = []
    real = trainer_module.chunked_lm_loss
    monkeypatch.setattr(trainer_module, "chunked_lm_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    losses = {}
    for chunked in (True, False):
        out = tmp_path / str(chunked)
        train(load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train={alpaca_file}",
                                 f"train.output_dir={out}", "train.max_steps=3", "train.per_device_train_batch_size=4",
                                 "train.logging_steps=1", "train.learning_rate=1e-2", "train.disable_tqdm=true",
                                 f"train.chunked_loss={str(chunked).lower()}", "data.packing=true"]))
        rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        losses[chunked] = [r["loss"] for r in rows if r["event"] == "log"]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert len(losses[True]) == 3 and len(calls) == 3  # the chunked path ran for each step of the first run
