"""Read raw records lazily from files, folders or the hub, each with the location errors will name.

JSON, JSONL and text files are parsed here, so a malformed line is reported by its line number;
CSV, TSV and Parquet go through `datasets` (streaming, so nothing is copied to its cache).
A bad line is yielded as a DataError rather than raised, so `on_bad_record: skip` can go on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftkit.errors import DataError, kind_of

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")

# (file, location, record or the error that replaced it)
RawRecord = tuple[str, "int | str", "dict[str, Any] | DataError"]


def data_files(path: str) -> list[Path]:
    """The files behind a path: the file itself, or a folder's supported files in sorted order."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(path, None, None, f"folder holds no data files ({', '.join(SUPPORTED_SUFFIXES)})")
        return files
    if p.suffix not in SUPPORTED_SUFFIXES:
        raise DataError(path, None, None, f"unsupported file type {p.suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    return [p]


def iter_records(path: str, txt_document: str = "line", split: str = "train") -> Iterator[RawRecord]:
    """Every record behind `path` in order; a path that does not exist locally is tried on the hub."""
    if not Path(path).exists():
        yield from _hub_records(path, split)
        return
    for file in data_files(path):
        reader = {".json": _json, ".jsonl": _jsonl, ".txt": _txt}.get(file.suffix, _tabular)
        for location, record in reader(file, txt_document):
            if not isinstance(record, (dict, DataError)):
                record = DataError(str(file), location, None, f"expected an object, got {kind_of(record)}")
            yield str(file), location, record


def _not_utf8(file: Path, e: UnicodeDecodeError, where: str = "") -> DataError:
    return DataError(str(file), where or None, None, f"is not UTF-8 text (byte {e.start}{' of the line' if where else ''}"
                     f": {e.object[e.start:e.start + 4]!r}); data files must be UTF-8 — convert it, e.g. "
                     f"`iconv -f latin1 -t utf-8 {file.name}`, or check that it is the file you meant")


def _read_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(file, e) from None
    except OSError as e:
        raise DataError(str(file), None, None, f"cannot be read: {e.strerror or e}") from None


def _lines(file: Path) -> Iterator[tuple[str, str | DataError]]:
    """(location, text or the decode error) for each non-empty line; a bad line does not stop the others."""
    try:
        f = file.open("rb")
    except OSError as e:
        raise DataError(str(file), None, None, f"cannot be read: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, _not_utf8(file, e, where)
                continue
            if line.strip():
                yield where, line


def _json(file: Path, _: str) -> Iterator[tuple[int | str, Any]]:
    text = _read_text(file)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(str(file), None, None, f"not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}. "
                        "A file of one JSON object per line must be named .jsonl") from e
    if not isinstance(records, list):
        raise DataError(str(file), None, None, "a .json data file must hold a list of records")
    yield from enumerate(records)


def _jsonl(file: Path, _: str) -> Iterator[tuple[int | str, Any]]:
    for where, line in _lines(file):
        if isinstance(line, DataError):
            yield where, line
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, DataError(str(file), where, None, f"not valid JSON (column {e.colno}): {e.msg}")


def _txt(file: Path, txt_document: str) -> Iterator[tuple[int | str, Any]]:
    if txt_document == "file":
        yield "the whole file", {"text": _read_text(file)}
        return
    for where, line in _lines(file):
        yield where, line if isinstance(line, DataError) else {"text": line.rstrip("\r\n")}


def _tabular(file: Path, _: str) -> Iterator[tuple[int | str, Any]]:
    import csv

    from datasets import load_dataset

    if file.suffix == ".parquet":
        try:  # pyarrow raises its own errors (ArrowInvalid) on a file that is not Parquet
            ds = load_dataset("parquet", data_files=str(file), split="train", streaming=True)
            yield from enumerate(ds)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file, named as such
            raise DataError(str(file), None, None, f"cannot be read as Parquet ({type(e).__name__}: {str(e)[:200]})") from e
        return
    sep = "\t" if file.suffix == ".tsv" else ","
    # TSV corpora (GLUE) hold bare quotes inside fields: read them literally.
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    ds = load_dataset("csv", data_files=str(file), split="train", streaming=True, sep=sep, quoting=quoting)
    try:
        for i, row in enumerate(ds):
            yield f"line {i + 2}", row  # line 1 is the header
    except Exception as e:  # pandas' parser errors carry the line in their text
        raise DataError(str(file), None, None, f"cannot be read as {file.suffix[1:].upper()}: {e}") from e


def _hub_records(name: str, split: str) -> Iterator[RawRecord]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:
        raise DataError(name, None, None, "is not a local file or folder, and reading it as a hub dataset failed "
                        f"({type(e).__name__}: {str(e)[:200]}). Check the path, or the network if it is a hub id") from e
    if first is None:
        return
    yield name, 0, first
    for i, row in enumerate(rows, start=1):
        yield name, i, row
