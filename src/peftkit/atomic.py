"""Atomic file writes: a temporary file in the same folder, then a rename. Readers never see half a file."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@functools.cache
def _host() -> str:
    """A short tag of this machine: on a file system shared by several nodes, a pid means something only
    on the host that wrote it."""
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _remove_orphans(target: Path) -> None:
    """Remove temporary siblings of `target` left by a killed process of this host (its pid and host are in
    the name; another node's writes in progress are left alone)."""
    prefix = f".{target.name}.tmp-"
    for p in target.parent.glob(f"{prefix}*"):
        pid, host = (p.name[len(prefix):].split("-") + ["", ""])[:2]
        if pid.isdigit() and host == _host() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def write_dir_atomic(target: Path, fill: Callable[[Path], None], marker: str | None = None) -> Path:
    """Fill a temporary sibling folder, write `marker` in it last (if given), then swap it in for `target`.

    If `fill` raises, nothing changes at `target`. A folder without its marker is an interrupted
    write: readers must ignore it. An old `target` is moved aside before the swap and removed after,
    so no file of the old folder survives into the new one. Callers decide whether `target` may be
    replaced. The temporary folder is named after this process, so one left by a killed process
    (SIGKILL skips every cleanup) is removed by the next write; it is created with the umask's mode
    (mkdtemp's 0700 would make an export unreadable to others).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{_host()}-{secrets.token_hex(4)}")
    tmp.mkdir()
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


class StorageError(PeftkitError):
    """A write failed for lack of space or an I/O error: the message names the path, free space and what was kept."""


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
# torch.save reports a short write as a RuntimeError ("... unexpected pos 123 vs 456", "file write failed").
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "No space left on device")


@contextlib.contextmanager
def storage_errors(path: Path, kept: Callable[[], str]) -> Iterator[None]:
    """Turn a failed write inside the block into a StorageError; `kept` says, when it happens, what survived."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        storage = storage_error(e, path, kept())
        if storage is not None:
            raise storage from e
        raise


def storage_error(e: BaseException, path: Path, kept: str) -> StorageError | None:
    """The user-facing StorageError for `e` if it is a failed write (disk full, quota, I/O), else None."""
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
        why = e.strerror or str(e)
    elif isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE_FAILURES):
        why = f"a write was cut short ({str(e).strip().splitlines()[-1][:120]}), most likely the disk is full"
    else:
        return None
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    return StorageError(f"writing under {path} failed: {why} ({free} on that file system). {kept}. "
                        "Free some space (or choose another folder) and run again")
