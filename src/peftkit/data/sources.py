"""Read records from .json / .jsonl files, keeping the file name for error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.errors import DataError

SUPPORTED_SUFFIXES = (".json", ".jsonl")


def read_records(file: str, max_samples: int | None = None) -> list[dict[str, Any]]:
    """The records of one file, in order; `max_samples` keeps the first N."""
    path = Path(file)
    if not path.is_file():
        raise DataError(file, None, None, "file does not exist")
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise DataError(file, None, None, f"unsupported file type {path.suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(file, len(records), None, f"line {lineno} is not valid JSON: {e.msg}") from e
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(file, None, None, f"not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
        if not isinstance(records, list):
            raise DataError(file, None, None, "a .json data file must hold a list of records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(file, index, None, f"expected an object, got {type(record).__name__}")
    return records[:max_samples] if max_samples else records
