"""Where a batch is built: dynamic padding for single records, and padded rows of packed records."""

from __future__ import annotations

from typing import Any

from peftkit.constants import IGNORE_INDEX


class PackedCollator:
    """Stack packed rows, padding each to the longest; padding is a record of its own, never attended to.

    No attention_mask, so transformers derives the per-record mask from position_ids, and
    `use_cache=False`: a forward that builds a cache silently ignores that mask.
    """

    def __init__(self, pad_token_id: int, fixed_shape: tuple[int, int] | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.fixed_shape = fixed_shape  # (rows, length): every batch the same shape, so torch.compile never recompiles

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        if self.fixed_shape:
            n_rows, width = self.fixed_shape
            empty = {"input_ids": [], "labels": [], "position_ids": []}
            rows = list(rows) + [empty] * (n_rows - len(rows))  # all-padding rows carry no label
        batch: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
        out: dict[str, Any] = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        out["use_cache"] = False
        return out


def build_collator(tokenizer: Any, packing: bool, fixed_shape: tuple[int, int] | None = None) -> Any:
    """The collator for `data.packing`: labels are always padded with IGNORE_INDEX.

    `fixed_shape` (rows, cutoff_len) pads every packed batch to one shape, for torch.compile.
    """
    if packing:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return PackedCollator(pad, fixed_shape)
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
