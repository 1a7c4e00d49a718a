"""Reading trainer_log.jsonl: the one reader the plot, the board and the log's own rewrite on resume share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.constants import TRAINER_LOG


class RunLog:
    """trainer_log.jsonl parsed once and then only its new complete lines.

    A line still being written (no newline yet) waits for the next read; a malformed line is skipped
    and counted. A file that shrank was rewritten (a resume drops the lines past its checkpoint): it is
    read again from the start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[dict[str, Any]] = []
        self.skipped = 0
        self._offset = 0
        self.file_id: int | None = None  # the inode: a new one means the file was rewritten

    def refresh(self) -> list[dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.lines, self._offset, self.skipped = [], 0, 0
            return self.lines
        if st.st_ino != self.file_id or st.st_size < self._offset:
            self.lines, self._offset, self.skipped, self.file_id = [], 0, 0, st.st_ino
        if st.st_size == self._offset:
            return self.lines
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(st.st_size - self._offset)
        end = chunk.rfind(b"\n") + 1  # only complete lines
        for raw in chunk[:end].splitlines():
            try:
                line = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.skipped += 1
                continue
            if isinstance(line, dict):
                self.lines.append(line)
            else:
                self.skipped += 1
        self._offset += end
        return self.lines


def read_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """The complete, parseable lines of a run's trainer_log.jsonl; a half-written last line is skipped."""
    return RunLog(Path(output_dir) / TRAINER_LOG).refresh()
