"""Best-fit-decreasing packing of examples into rows of cutoff_len, each record isolated.

Inside a row, position_ids restart at 0 for every record and no attention mask is passed:
transformers then derives the block-diagonal causal mask from the restarts (eager, sdpa) or the
varlen boundaries (flash attention), so no record attends to another. The first token of each
record is never a label, so it is never predicted from the record before it. Rows stay separate
in a batch: attention cost grows with the row, not with the batch's total length.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from peftkit.constants import IGNORE_INDEX


def pack_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each bin: longest first, each into the fullest bin it fits."""
    rems: list[int] = []  # sorted distinct remaining capacities that some open bin has
    bins_with: dict[int, list[int]] = {}
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[i]
        at = bisect.bisect_left(rems, length)
        if at == len(rems):
            bins.append([])
            b, rem = len(bins) - 1, capacity
        else:
            rem = rems[at]
            b = bins_with[rem].pop()
            if not bins_with[rem]:
                del bins_with[rem]
                rems.pop(at)
        bins[b].append(i)
        left = rem - length
        if left > 0:
            if left not in bins_with:
                bins_with[left] = []
                bisect.insort(rems, left)
            bins_with[left].append(b)
    return bins


def pack_row(examples: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """One packed row: ids and labels concatenated, positions restarting per record, first labels ignored."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(ex["labels"][1:])
        row["position_ids"] += list(range(len(ex["input_ids"])))
    return row


def pack_examples(examples: list[dict[str, Any]], cutoff_len: int) -> list[dict[str, list[int]]]:
    """Rows of at most cutoff_len tokens, from examples that each fit in cutoff_len."""
    bins = pack_bfd([len(ex["input_ids"]) for ex in examples], cutoff_len)
    return [pack_row([examples[i] for i in b]) for b in bins]


def pack_stream(examples: Iterable[dict[str, Any]], cutoff_len: int, buffer: int = 2048) -> Iterator[dict[str, list[int]]]:
    """Packing on the fly: best-fit-decreasing within each buffer of examples."""
    chunk: list[dict[str, Any]] = []
    for ex in examples:
        chunk.append(ex)
        if len(chunk) == buffer:
            yield from pack_examples(chunk, cutoff_len)
            chunk = []
    if chunk:
        yield from pack_examples(chunk, cutoff_len)


def unpack_row(row: dict[str, list[int]]) -> list[dict[str, list[int]]]:
    """The records of a packed row (for showing them); the first label of each stays ignored."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [{"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]} for a, b in itertools.pairwise(starts)]
