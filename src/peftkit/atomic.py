"""Atomic file writes: a temporary file in the same folder, then a rename. Readers never see half a file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Pretty, UTF-8 unescaped JSON, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_dir_atomic(target: Path, fill: Callable[[Path], None], marker: str | None = None) -> Path:
    """Fill a temporary sibling folder, write `marker` in it last (if given), then swap it in for `target`.

    If `fill` raises, nothing changes at `target`. A folder without its marker is an interrupted
    write: readers must ignore it. An old `target` is moved aside before the swap and removed after,
    so no file of the old folder survives into the new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        if marker:
            (tmp / marker).write_text("ok\n", encoding="utf-8")
        old = None
        if target.exists():
            old = target.with_name(f"{tmp.name}.old")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
