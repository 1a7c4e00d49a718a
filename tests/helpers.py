"""What several test files share: the repository's paths and the overrides of a tiny training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from peftkit.constants import IGNORE_INDEX
from peftkit.data import build_collator
from peftkit.data.packing import pack_examples

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
DPO = REPO / "data/demo/dpo_en_demo.json"
MRPC = REPO / "data/mrpc/train.tsv"
MRPC_COLUMNS = "data.columns={text: '#1 String', text_pair: '#2 String', label: Quality}"


def tiny_run(model: Path, out: Path, *extra: str, data: Path | None = None, stage: str | None = None,
             cutoff_len: int = 128, max_steps: int = 2, batch_size: int = 4, learning_rate: str = "1e-2",
             logging_steps: int | None = 1, seed: int | None = None) -> list[str]:
    """Overrides of a run of a few steps on a tiny model; `extra` last, so it wins."""
    return [
        *([f"stage={stage}"] if stage else []),
        f"model.name_or_path={model}",
        *([f"data.train={data}"] if data else []),
        f"train.output_dir={out}",
        f"data.cutoff_len={cutoff_len}",
        f"train.max_steps={max_steps}",
        f"train.per_device_train_batch_size={batch_size}",
        f"train.learning_rate={learning_rate}",
        *([f"train.logging_steps={logging_steps}"] if logging_steps else []),
        *([f"train.seed={seed}"] if seed is not None else []),
        "train.disable_tqdm=true",
        *extra,
    ]


# Conversations and the label oracle of the mask tests (unit and embedded-model tiers).
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 3 and 4."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "And 2 more?"},
    {"role": "assistant", "content": "9, done."},
]
SINGLE = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]


def chat_ids(tokenizer, messages, gen=False, tools=None) -> list[int]:
    """apply_chat_template's token ids: the reference every mask test compares with."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=gen,
                                         return_dict=False)


def expected_labels(tokenizer, messages, turns, tools=None) -> list[int]:
    """The oracle: for each supervised assistant turn k, the tokens between prompt(k) and full(k+1)."""
    full = chat_ids(tokenizer, messages, tools=tools)
    labels = [IGNORE_INDEX] * len(full)
    for k in turns:
        start = len(chat_ids(tokenizer, messages[:k], gen=True, tools=tools))
        end = len(chat_ids(tokenizer, messages[: k + 1], tools=tools))
        labels[start:end] = full[start:end]
    return labels


# The packed-equals-one-by-one check of the packing tests (unit and embedded-model tiers).
def _loss_and_grads(model, batch: dict) -> tuple[float, dict[str, Any]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def one_by_one(model, examples: list[dict]) -> tuple[float, dict[str, Any]]:
    """Token-weighted loss and gradients of the records run separately."""
    model.zero_grad()
    total = sum(sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX) for ex in examples)
    value = 0.0
    for ex in examples:
        ids, labels = torch.tensor([ex["input_ids"]], device=model.device), torch.tensor([ex["labels"]], device=model.device)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX,
                                                 reduction="sum")
        (loss / total).backward()
        value += loss.item() / total
    return value, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_packed_equals_one_by_one(model, tokenizer, examples: list[dict], cutoff_len: int, flatten: bool = False,
                                    tolerance: tuple[float, float] = (1e-5, 1e-4)) -> None:
    """Packed rows (or one flattened row) give the loss and gradients of the records run one by one, to
    (atol, rtol) `tolerance`."""
    rows = pack_examples(examples, cutoff_len)
    assert len(rows) < len(examples)  # records really share rows
    batch = build_collator(tokenizer, packing=True, flatten=flatten)(rows)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert (batch["input_ids"].shape[0] == 1) == flatten
    batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    packed_loss, packed_grads = _loss_and_grads(model, batch)
    ref_loss, ref_grads = one_by_one(model, examples)
    atol, rtol = tolerance
    assert packed_loss == pytest.approx(ref_loss, abs=atol, rel=rtol)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=atol, rtol=rtol, msg=name)
