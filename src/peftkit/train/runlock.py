"""One writer per output_dir: an OS file lock held for the run's whole life.

`flock` is released by the kernel when the process dies, however it dies, so a SIGKILLed run never
leaves a stale lock behind; the file only records who held it last (pid and host) for the message a
second process prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from types import TracebackType

from peftkit.errors import PeftkitError

LOCK_FILE = ".peftkit.lock"


class RunLocked(PeftkitError):
    """Another process is training into the same output_dir."""


class RunLock:
    """`with RunLock(output_dir):` — raises RunLocked at once if another process holds it."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by another peftkit train (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}); wait for it to finish, stop it, or choose another train.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race a waiting process)
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
