"""Where a batch is built: dynamic padding for single records, and padded rows of packed records."""

from __future__ import annotations

from typing import Any

from peftkit.constants import IGNORE_INDEX
from peftkit.errors import PeftkitError


class PackedCollator:
    """Stack packed rows, padding each to the longest; padding is a record of its own, never attended to.

    No attention_mask, so transformers derives the per-record mask from position_ids, and
    `use_cache=False`: a forward that builds a cache silently ignores that mask.
    `flatten` (an attention that runs varlen sequences, model/attention.py): the rows go in as one
    row with no padding, plus the sequence boundaries (cu_seq_lens_q / _k, max_length_q / _k) that
    transformers' flash path and torch_varlen read, as DataCollatorWithFlattening sends them.
    """

    def __init__(self, pad_token_id: int, fixed_shape: tuple[int, int] | None = None, flatten: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.fixed_shape = fixed_shape  # (rows, length): every batch the same shape, so torch.compile never recompiles
        self.flatten = flatten

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.flatten:
            batch = self._flattened(rows)
        else:
            batch = self._padded_rows(rows)
        out: dict[str, Any] = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if self.flatten:
            starts = [i for i, p in enumerate(batch["position_ids"][0]) if p == 0] + [len(batch["position_ids"][0])]
            cu = torch.tensor(starts, dtype=torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        out["use_cache"] = False
        return out

    def _padded_rows(self, rows: list[dict[str, Any]]) -> dict[str, list[list[int]]]:
        width = max(len(r["input_ids"]) for r in rows)
        if self.fixed_shape:
            n_rows, width = self.fixed_shape
            empty: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
            rows = list(rows) + [empty] * (n_rows - len(rows))  # all-padding rows carry no label
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
        return batch

    def _flattened(self, rows: list[dict[str, Any]]) -> dict[str, list[list[int]]]:
        """One row; with fixed_shape (rows, length) padded to rows x length by padding records of at most length."""
        flat: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            for k in flat:
                flat[k] += list(r[k])
        if self.fixed_shape:
            n_rows, width = self.fixed_shape
            pad = n_rows * width - len(flat["input_ids"])
            flat["input_ids"] += [self.pad_token_id] * pad
            flat["labels"] += [IGNORE_INDEX] * pad
            flat["position_ids"] += [i % width for i in range(pad)]
        return {k: [v] for k, v in flat.items()}


class PairCollator:
    """Preference pairs as one batch of 2B rows, chosen first, then rejected (one forward for both).

    Right padding with an attention_mask; labels padded with IGNORE_INDEX.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.pad_token_id = _pad_id(tokenizer)

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [(p["input_ids"], p["labels"]) for p in pairs] + [
            (p["rejected_input_ids"], p["rejected_labels"]) for p in pairs]
        return _padded(rows, self.pad_token_id)


def _padded(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded input_ids, attention_mask and labels (padded with IGNORE_INDEX) of (ids, labels) rows."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    return {"input_ids": torch.tensor([list(i) + [pad_token_id] * (width - len(i)) for i, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows]),
            "labels": torch.tensor([list(lab) + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])}


class UnpairedCollator:
    """kto: B judged examples, then B mismatched rows for the KL estimate — example i's prompt with example
    i+1's answer (TRL's construction) — as one batch of 2B rows, plus `desirable` (B,)."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad_token_id = _pad_id(tokenizer)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = [(e["input_ids"], e["labels"]) for e in examples]
        starts = [next(k for k, t in enumerate(lab) if t != IGNORE_INDEX) for _, lab in rows]
        mismatched = []
        for i, ((ids, _), start) in enumerate(zip(rows, starts)):
            other_ids, other_labels = rows[(i + 1) % len(rows)]
            other_start = starts[(i + 1) % len(rows)]
            mismatched.append((list(ids[:start]) + list(other_ids[other_start:]),
                               [IGNORE_INDEX] * start + list(other_labels[other_start:])))
        batch = _padded(rows + mismatched, self.pad_token_id)
        batch["desirable"] = torch.tensor([int(e["desirable"]) for e in examples])
        return batch


class PromptCollator:
    """grpo: prompts left padded (generation appends to the right), with their `prompt` and `reference` strings."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad_token_id = _pad_id(tokenizer)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        pads = [width - len(e["input_ids"]) for e in examples]
        return {"input_ids": torch.tensor([[self.pad_token_id] * p + list(e["input_ids"]) for e, p in zip(examples, pads)]),
                "attention_mask": torch.tensor([[0] * p + [1] * (width - p) for p in pads]),
                "prompt": [e["prompt"] for e in examples], "reference": [e["reference"] for e in examples]}


class ImageCollator:
    """An image-text run's batches: the stage's collator builds the tokens; the processor's image processor turns
    the batch's images (each example's `images` references, in order) into the model's pixel inputs
    (pixel_values and their companions: image_grid_thw, pixel_attention_mask, ...), as the processor's own call
    does for the same texts. Per-token image inputs a family reads (Gemma 3's token_type_ids) are made from the ids.
    """

    def __init__(self, base: Any, processor: Any) -> None:
        from peftkit.data.images import image_token_ids, soft_token_id

        self.base, self.processor = base, processor
        self.marks = sorted(image_token_ids(processor))
        self.soft_token = soft_token_id(processor)
        self.token_types = _per_token_image_inputs(processor)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from peftkit.data.images import load_image

        refs = [list(e.get("images") or []) for e in examples]
        batch = self.base([{k: v for k, v in e.items() if k != "images"} for e in examples])
        if not any(refs):
            if self.marks and bool(torch.isin(batch["input_ids"], torch.tensor(self.marks)).any()):
                raise PeftkitError("a batch holds image tokens but no images: the examples lost their `images` "
                                   "column (a model without pixels would read the placeholders as text)")
            return batch
        # nested per example, an empty list for one without images: Idefics3's pixel_values are (examples, images)
        pictures = [[load_image(r) for r in row] for row in refs]
        inputs = self.processor.image_processor(images=pictures, return_tensors="pt")
        batch.update({k: v for k, v in inputs.items() if k != "num_crops"})  # (Gemma 3's: its processor drops it)
        for key in self.token_types:  # 1 where each image feature goes (Gemma 3's soft tokens, Qwen-VL's pads)
            batch[key] = (batch["input_ids"] == self.soft_token).to(torch.long)
        return batch


def _per_token_image_inputs(processor: Any) -> list[str]:
    """The per-token inputs the processor's own call returns beside input_ids (Gemma 3's token_type_ids, which its
    forward needs in training to let an image's tokens attend to each other)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    probe = processor(text=[tokenizer.decode([tokenizer.eos_token_id])], add_special_tokens=False)
    return [k for k in ("token_type_ids", "mm_token_type_ids") if k in probe]


def chosen_and_rejected(rows: Any) -> tuple[Any, Any]:
    """Split what a PairCollator batch produced (any per-row tensor) back into its chosen and rejected halves."""
    return rows.chunk(2)


def _pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_collator(tokenizer: Any, packing: bool, fixed_shape: tuple[int, int] | None = None, stage: str = "sft",
                   flatten: bool = False, processor: Any = None) -> Any:
    """The collator of the stage (and `data.packing`): packed rows, for a stage that packs, go to PackedCollator;
    records one by one to the collator the stage table names, built from the tokenizer.

    `fixed_shape` (rows, cutoff_len) pads every packed batch to one shape, for torch.compile; `flatten`
    (model/attention.py's flattens) sends packed rows as one row. An image-text model's `processor` adds the pixel
    inputs of records with images (never packed: data/dataset.py refuses it).
    """
    from peftkit.model.loading import has_images
    from peftkit.stages import stage as stage_of

    entry = stage_of(stage)
    if packing and entry.packing:
        return PackedCollator(_pad_id(tokenizer), fixed_shape, flatten)
    collator = entry.load("collator")(tokenizer)
    return ImageCollator(collator, processor) if has_images(processor) else collator
