"""What the board knows about a run: its log read incrementally, its status, its files.

A run is a folder under RUNS_DIR holding trainer_log.jsonl (see train/callbacks.py for the events).
Every path the board touches goes through `confined`, so a request naming ../ anything finds nothing.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.constants import DATA_REPORT_FILE, LOSS_PLOT, TRAINER_LOG
from peftkit.train.checkpoints import checkpoints

_SKIP_DIRS = ("checkpoint-", "lora_init", ".")
_MAX_DEPTH = 4
# Files a run page offers for download (besides the adapter / weights listing).
_RESULT_PREFIXES = ("generated_predictions", "pair_scores", "class_predictions", "predict_results", "run_summary")


def confined(root: Path, relative: str) -> Path | None:
    """root / relative if it stays inside root (symlinks resolved), else None."""
    root = root.resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return path if path == root or path.is_relative_to(root) else None


def _pid_alive(pid: Any) -> bool:
    """Whether pid is a live peftkit process on this machine (a reused pid of another program is not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return b"peftkit" in cmdline and stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has ended


@dataclass
class RunInfo:
    """One run as the list and the run page show it."""

    id: str
    status: str  # starting / running / finished / stopped / failed
    current_steps: int = 0
    total_steps: int = 0
    percentage: float = 0.0
    elapsed_time: str | None = None
    remaining_time: str | None = None
    last_loss: float | None = None
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    tokens_per_second: float | None = None
    peak_memory_mb: float | None = None
    started: float | None = None
    updated: float | None = None
    message: str | None = None
    pid: int | None = None
    resumable: bool = False


def run_status(lines: list[dict[str, Any]], alive: bool | None) -> str:
    """The status a log shows; `alive` is whether its process runs (None: not knowable from here)."""
    if not lines:
        return "starting" if alive else "failed"
    last_begin = max((i for i, ln in enumerate(lines) if ln.get("event") == "train_begin"), default=-1)
    end = next((ln for ln in reversed(lines[last_begin + 1:]) if ln.get("event") in ("train_end", "error")), None)
    if alive:
        return "running"
    if end is None:
        return "running" if alive is None else "failed"
    status = end.get("status")
    if end.get("event") == "train_end" and status in ("finished", "stopped_early", None):
        return "finished"
    if status == "interrupted":
        return "stopped"
    return "failed"


def summarise(run_id: str, lines: list[dict[str, Any]], alive: bool | None, run_dir: Path) -> RunInfo:
    info = RunInfo(id=run_id, status=run_status(lines, alive))
    for ln in lines:
        if ln.get("event") == "train_begin":
            info.pid = ln.get("pid")
            if info.started is None:
                info.started = ln.get("time")
        if ln.get("event") == "log" and isinstance(ln.get("loss"), (int, float)):
            info.last_loss = ln["loss"]
        if isinstance(ln.get("eval_loss"), (int, float)) and (info.best_eval_loss is None
                                                             or ln["eval_loss"] < info.best_eval_loss):
            info.best_eval_loss, info.best_eval_step = ln["eval_loss"], ln.get("current_steps")
        if ln.get("event") == "error":
            info.message = ln.get("message")
    if lines:
        last = lines[-1]
        info.current_steps = last.get("current_steps") or 0
        info.total_steps = last.get("total_steps") or 0
        info.percentage = last.get("percentage") or 0.0
        info.elapsed_time, info.updated = last.get("elapsed_time"), last.get("time")
        info.remaining_time = last.get("remaining_time") if info.status == "running" else None
        speeds = [ln["tokens_per_second"] for ln in lines if isinstance(ln.get("tokens_per_second"), (int, float))]
        info.tokens_per_second = speeds[-1] if speeds else None
        info.peak_memory_mb = max((ln["peak_memory_mb"] for ln in lines
                                   if isinstance(ln.get("peak_memory_mb"), (int, float))), default=None)
    # what `train.resume_from_checkpoint=true` would find: a checkpoint whose write completed
    info.resumable = info.status in ("stopped", "failed") and any(ok for _, _, ok in checkpoints(run_dir))
    return info


def process_alive(lines: list[dict[str, Any]]) -> bool | None:
    """Whether the process that wrote the latest train_begin still runs; None if it ran on another host."""
    begin = next((ln for ln in reversed(lines) if ln.get("event") == "train_begin"), None)
    if begin is None:
        return None
    if begin.get("host") not in (None, socket.gethostname()):
        return None
    return _pid_alive(begin.get("pid"))


def discover(runs_dir: Path) -> list[Path]:
    """Folders under runs_dir holding a trainer_log.jsonl (checkpoints and hidden folders skipped)."""
    found = []
    base_depth = len(runs_dir.resolve().parts)
    for dirpath, dirnames, filenames in os.walk(runs_dir.resolve()):
        if len(Path(dirpath).parts) - base_depth >= _MAX_DEPTH:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if not d.startswith(_SKIP_DIRS)]
        if TRAINER_LOG in filenames:
            found.append(Path(dirpath))
    return found


def run_files(run_dir: Path) -> dict[str, Any]:
    """What a run page links to: the loss plot, results, and the saved model files (name, bytes)."""
    if not run_dir.is_dir():  # a launched run before its first write
        return {"plot": None, "results": [], "model": [], "checkpoints": []}
    files = sorted(p for p in run_dir.iterdir() if p.is_file())
    return {
        "plot": LOSS_PLOT if (run_dir / LOSS_PLOT).is_file() else None,
        "results": [p.name for p in files if p.name.startswith(_RESULT_PREFIXES)],
        "model": [{"name": p.name, "bytes": p.stat().st_size} for p in files
                  if p.suffix in (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")
                  and not p.name.startswith(_RESULT_PREFIXES) and p.name != DATA_REPORT_FILE],
        "checkpoints": [p.name for _, p, ok in checkpoints(run_dir) if ok],
    }


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_config(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """The resolved config.yaml as text and as a mapping (empty if missing or unreadable)."""
    from peftkit.rundir import run_config

    return run_config(run_dir)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_diff(configs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Keys whose values differ between the configs, each with one value per config (None where absent)."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str)
                                                                for f in flat}) > 1}


