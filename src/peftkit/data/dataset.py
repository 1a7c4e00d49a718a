"""Files → tokenized `datasets.Dataset`: read, convert to messages, encode, report what happened."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from peftkit.config.schema import DataArgs
from peftkit.constants import IGNORE_INDEX
from peftkit.data.encode import encode_messages
from peftkit.data.formats import FORMATS
from peftkit.data.sources import read_records
from peftkit.data.template import stop_token_ids

logger = logging.getLogger("peftkit")


@dataclass
class DataReport:
    """What preprocessing did, so nothing is discarded or cut silently."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_first: list[str] = field(default_factory=list)
    tokens: int = 0
    supervised_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_file_list(files: str | list[str] | None) -> list[str]:
    """`data.train` / `data.eval` as a list of files."""
    return [files] if isinstance(files, str) else list(files or [])


def load_messages(files: list[str], args: DataArgs) -> list[tuple[list[dict[str, str]], tuple[str, int]]]:
    """Every record of every file as (messages, (file, index))."""
    convert = FORMATS[args.format]
    out = []
    for file in files:
        for index, record in enumerate(read_records(file, args.max_samples)):
            out.append((convert(record, file, index), (file, index)))
    return out


def build_dataset(files: list[str], args: DataArgs, tokenizer: Any) -> tuple[Any, DataReport]:
    """A Dataset of input_ids / attention_mask / labels, and the report of how it was made."""
    from datasets import Dataset

    report = DataReport()
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for messages, where in load_messages(files, args):
        report.records += 1
        example, cut = encode_messages(tokenizer, messages, args.cutoff_len, where)
        if example is None:
            report.dropped += 1
            if len(report.dropped_first) < 3:
                report.dropped_first.append(f"{where[0]}: record {where[1]}")
            continue
        report.truncated += int(cut)
        report.examples += 1
        report.tokens += len(example["input_ids"])
        report.supervised_tokens += sum(label != IGNORE_INDEX for label in example["labels"])
        for key, values in columns.items():
            values.append(example[key])
    _log_report(files, report, args.cutoff_len)
    if columns["input_ids"]:
        _check_end_of_turn_supervised(tokenizer, columns["labels"][0])
    return Dataset.from_dict(columns), report


def _log_report(files: list[str], report: DataReport, cutoff_len: int) -> None:
    logger.info(
        "%s: %d records -> %d examples, %d tokens (%d supervised), %d truncated to cutoff_len=%d",
        ", ".join(files), report.records, report.examples, report.tokens, report.supervised_tokens,
        report.truncated, cutoff_len,
    )
    if report.dropped:
        logger.warning(
            "dropped %d record(s) whose response would not fit in data.cutoff_len=%d (first: %s); "
            "raise data.cutoff_len to keep them", report.dropped, cutoff_len, "; ".join(report.dropped_first),
        )


def _check_end_of_turn_supervised(tokenizer: Any, labels: list[int]) -> None:
    stops = set(stop_token_ids(tokenizer))
    if not stops.intersection(labels):
        logger.warning(
            "the chat template leaves the end-of-turn token outside the labels: the model will not learn "
            "to stop. Use a template whose assistant turn ends with %s.", tokenizer.eos_token,
        )


def describe_example(tokenizer: Any, example: dict[str, list[int]]) -> str:
    """The decoded example with supervised spans in [[...]], for the log and for humans."""
    parts, current, supervised = [], [], None
    for token, label in zip(example["input_ids"], example["labels"]):
        is_sup = label != IGNORE_INDEX
        if supervised is not None and is_sup != supervised:
            parts.append((supervised, current))
            current = []
        supervised = is_sup
        current.append(token)
    parts.append((bool(supervised), current))
    return "".join(
        f"[[{tokenizer.decode(ids)}]]" if sup else tokenizer.decode(ids) for sup, ids in parts
    )
