"""LogCallback: one JSON line per logging event in <output_dir>/trainer_log.jsonl, for live plots."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from peftkit.constants import LOG_SCHEMA_VERSION, TRAINER_LOG


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class LogCallback(TrainerCallback):
    """Appends progress lines with the original design's fields; only the main process writes.

    A fresh run (global step 0) removes an old log in the same output_dir; a resumed run appends.
    Elapsed and remaining time count only this process's steps, so a resume does not fake speed.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self.start_time = 0.0
        self.start_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.path = Path(args.output_dir) / TRAINER_LOG
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if state.global_step == 0 and self.path.exists():
            self.path.unlink()
        self.start_time, self.start_step = time.time(), state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.path is None:
            return
        logs = logs or {}
        elapsed = time.time() - self.start_time
        done = state.global_step - self.start_step
        remaining = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
        event = "eval" if "eval_loss" in logs else "train_end" if "train_runtime" in logs else "log"
        line = {
            "v": LOG_SCHEMA_VERSION,
            "event": event,
            "current_steps": state.global_step,
            "total_steps": state.max_steps,
            "loss": logs.get("loss", logs.get("train_loss")),
            "eval_loss": logs.get("eval_loss"),
            "reward": logs.get("reward"),
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "epoch": logs.get("epoch", state.epoch),
            "percentage": round(100 * state.global_step / state.max_steps, 2) if state.max_steps else None,
            "elapsed_time": _clock(elapsed),
            "remaining_time": _clock(remaining) if remaining is not None else None,
            "elapsed_seconds": round(elapsed, 3),
            "remaining_seconds": round(remaining, 3) if remaining is not None else None,
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
