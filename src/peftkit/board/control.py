"""Start, stop and resume runs from the board: `peftkit train` as a detached child process.

The child runs in its own session, so closing the browser or restarting the board never stops it.
Stopping sends SIGTERM, which PeftTrainer turns into "save a checkpoint at this step, then stop".
Only config files under the board's root (RUNS_DIR's parent) can be launched, and only into an
output_dir under RUNS_DIR, where the board can see the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from peftkit.board.runs import confined
from peftkit.errors import PeftkitError
from peftkit.rundir import config_file

_CONFIG_SUFFIXES = (".yaml", ".yml")
_CWD_LOCK = threading.Lock()  # the board's own requests use absolute paths only


class ControlError(Exception):
    """A request the board refuses; status is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Launched:
    run_dir: Path
    process: subprocess.Popen
    console: Path  # the child's stdout and stderr
    started: float


class Launcher:
    def __init__(self, runs_dir: Path, root: Path) -> None:
        self.runs_dir, self.root = runs_dir.resolve(), root.resolve()
        self.children: dict[Path, Launched] = {}

    def configs(self) -> list[str]:
        """Config files that may be launched, relative to the root (runs' own saved configs left out)."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("node_modules", "__pycache__")
                           and here / d != self.runs_dir]
            out += [str((here / f).relative_to(self.root)) for f in filenames if f.endswith(_CONFIG_SUFFIXES)]
        return sorted(out)

    def child(self, run_dir: Path) -> Launched | None:
        launched = self.children.get(run_dir.resolve())
        if launched is not None:
            launched.process.poll()  # reaps an ended child
        return launched

    def running_child(self, run_dir: Path) -> bool:
        launched = self.child(run_dir)
        return launched is not None and launched.process.returncode is None

    def start(self, config: str, overrides: list[str]) -> Path:
        path = confined(self.root, config)
        if path is None or not path.is_file() or path.suffix not in _CONFIG_SUFFIXES:
            raise ControlError(404, f"no config file {config!r} under {self.root}")
        if not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ControlError(400, "overrides must be strings of the form section.key=value")
        return self._launch(path, overrides)

    def resume(self, run_dir: Path) -> Path:
        config = config_file(run_dir)
        if not config.is_file():
            raise ControlError(409, f"{run_dir.name} has no config.yaml to resume from")
        # the saved config's output_dir may be relative to wherever it was first started: name this folder
        return self._launch(config, [f"train.output_dir={run_dir}", "train.resume_from_checkpoint=true"])

    def stop(self, run_dir: Path, pid: int | None) -> None:
        launched = self.child(run_dir)
        target = launched.process.pid if launched and launched.process.returncode is None else pid
        if target is None:
            raise ControlError(409, f"{run_dir.name} is not a process of this machine the board can signal")
        try:
            os.kill(target, signal.SIGTERM)
        except ProcessLookupError as e:
            raise ControlError(409, f"{run_dir.name} is not running") from e

    def _launch(self, config: Path, overrides: list[str]) -> Path:
        from peftkit.config.load import load_config

        with _CWD_LOCK:  # the config's relative paths are checked from the root, where the child will run
            previous = os.getcwd()
            os.chdir(self.root)
            try:
                cfg = load_config(str(config), overrides)
            except PeftkitError as e:
                raise ControlError(400, str(e)) from e
            finally:
                os.chdir(previous)
        output_dir = Path(cfg.train["output_dir"])  # load_config insists on one
        run_dir = (output_dir if output_dir.is_absolute() else self.root / output_dir).resolve()
        if not run_dir.is_relative_to(self.runs_dir) or run_dir == self.runs_dir:
            raise ControlError(400, f"train.output_dir {str(output_dir)!r} is not a folder under {self.runs_dir}: "
                                    "the board shows only runs there (add the override train.output_dir=...)")
        if self.running_child(run_dir):
            raise ControlError(409, f"a run is already writing {run_dir}")
        consoles = self.runs_dir / ".board"
        consoles.mkdir(parents=True, exist_ok=True)
        console = consoles / f"{run_dir.relative_to(self.runs_dir).as_posix().replace('/', '__')}.log"
        command = [sys.executable, "-m", "peftkit", "train", str(config), *overrides]
        with open(console, "ab") as out:
            out.write(f"$ {' '.join(command)}\n".encode())
            out.flush()
            process = subprocess.Popen(command, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.children[run_dir] = Launched(run_dir, process, console, time.time())
        return run_dir

    def kill_all(self) -> None:
        """Kill every child still running (tests; the board itself leaves its runs alone)."""
        for launched in self.children.values():
            if launched.process.poll() is None:
                launched.process.kill()
                launched.process.wait()

    def console_tail(self, run_dir: Path, limit: int = 4000) -> str | None:
        launched = self.child(run_dir)
        if launched is None:
            return None
        try:
            data = launched.console.read_bytes()[-limit:]
        except OSError:
            return None
        return data.decode("utf-8", errors="replace")
