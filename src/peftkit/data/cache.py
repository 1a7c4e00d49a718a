"""The tokenized-dataset cache: keyed by everything that could change its content, written atomically.

The key hashes the data files' bytes, the tokenizer (its vocabulary and merges, special tokens and
chat template), every data option that shapes examples, and the peftkit version: a change to any
of them is a new key, never a stale hit. Hub datasets are not cached here (their content has no
local hash); `datasets` caches their download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peftkit import __version__
from peftkit.atomic import storage_errors, write_dir_atomic
from peftkit.config.schema import DataArgs, DatasetSpec
from peftkit.constants import COMPLETE_MARKER
from peftkit.data.sources import data_files
from peftkit.model.resolve import peftkit_home

logger = logging.getLogger("peftkit")
# Options that change how fast, not what, is built.
_NOT_IN_KEY = ("overwrite_cache", "preprocessing_num_workers", "streaming", "train", "eval")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of everything in the tokenizer that changes token ids; remembered per tokenizer object (hashing the
    vocabulary again for every dataset is what it saves)."""
    stamp = (tokenizer.chat_template, len(tokenizer), str(tokenizer.special_tokens_map))
    cached = _DIGESTS.get(tokenizer)
    if cached and cached[0] == stamp:
        return cached[1]
    digest = _tokenizer_digest(tokenizer)
    _DIGESTS[tokenizer] = (stamp, digest)
    return digest


_DIGESTS: weakref.WeakKeyDictionary[Any, tuple[Any, str]] = weakref.WeakKeyDictionary()


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())),
        tokenizer.chat_template or "",
        json.dumps({"special": tokenizer.special_tokens_map, "eos": tokenizer.eos_token_id,
                    "pad": tokenizer.pad_token_id}, sort_keys=True, default=str),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def fingerprint(train: list[DatasetSpec], eval_: list[DatasetSpec], args: DataArgs, tokenizer: Any,
                stage: str = "sft", images: str | None = None) -> str | None:
    """The cache key, or None when a dataset has no local files to hash; `images` is an image-text run's digest of
    its images and processor (data/dataset.py)."""
    files: list[Any] = []
    for spec in [*train, None, *eval_]:  # None separates train from eval
        if spec is None:
            files.append("--eval--")
            continue
        if not Path(spec.path).exists():
            return None
        files.append([asdict(spec), [(str(f), _file_digest(f)) for f in data_files(spec.path)]])
    options = {k: v for k, v in asdict(args).items() if k not in _NOT_IN_KEY}
    key = json.dumps([__version__, stage, options, files, tokenizer_digest(tokenizer), *([images] if images else [])],
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def cache_dir(key: str) -> Path:
    return peftkit_home() / "data_cache" / key


_CHECKSUMS = "checksums.json"


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (but the checksum list and the marker), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (_CHECKSUMS, COMPLETE_MARKER)}


def load_cache(key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The cached splits and report, or None if there is no complete, intact cache for this key.

    Every file is checked against the checksums written with it: a truncated, overwritten or
    half-deleted cache is rebuilt (one warning), never loaded as silently different data.
    """
    from datasets import load_from_disk

    folder = cache_dir(key)
    if not (folder / COMPLETE_MARKER).is_file():
        return None
    try:
        expected = json.loads((folder / _CHECKSUMS).read_text(encoding="utf-8"))
        actual = _digests(folder)  # files added later (datasets' own cache-*.arrow) change no listed one
        damaged = [name for name, digest in expected.items() if actual.get(name) != digest]
        if damaged:
            raise ValueError(f"{len(damaged)} file(s) missing or changed since written, e.g. {damaged[0]}")
        report = json.loads((folder / "data_report.json").read_text(encoding="utf-8"))
        splits = {p.name: load_from_disk(str(p)) for p in sorted(folder.iterdir()) if p.is_dir()}
    except Exception as e:  # noqa: BLE001 - whatever is wrong with a cache, the answer is to rebuild it
        logger.warning("data cache %s is damaged (%s: %s); rebuilding it", folder, type(e).__name__, str(e)[:200])
        return None
    return splits, report


def save_cache(key: str, splits: dict[str, Any], report: dict[str, Any]) -> Path:
    """Write the splits and their checksums to a temporary folder and rename it into place: never half a cache."""
    def fill(tmp: Path) -> None:
        for name, ds in splits.items():
            if ds is not None:
                ds.save_to_disk(str(tmp / name))
        (tmp / "data_report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        (tmp / _CHECKSUMS).write_text(json.dumps(_digests(tmp), indent=1), encoding="utf-8")

    target = cache_dir(key)
    try:
        with storage_errors(target, lambda: "Kept: no cache entry (a partial one is never written)"):
            return write_dir_atomic(target, fill, COMPLETE_MARKER)
    except OSError:
        if (target / COMPLETE_MARKER).is_file():  # another node wrote the same entry at the same moment
            return target
        raise
