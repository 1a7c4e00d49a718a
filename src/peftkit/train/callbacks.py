"""LogCallback: one JSON line per event in <output_dir>/trainer_log.jsonl, for live plots and the board.

Events: train_begin, log, eval, save, train_end, error. Every line has the original design's fields
(current_steps, total_steps, loss, reward, learning_rate, epoch, percentage, elapsed_time,
remaining_time) plus grad_norm, tokens seen (fed / real / supervised, cumulative over the run),
real tokens per second and peak memory. Only the main process writes; each line is flushed.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from peftkit.atomic import write_text_atomic
from peftkit.config.load import trackers as tracker_list
from peftkit.constants import LOG_SCHEMA_VERSION, TRAINER_LOG
from peftkit.train.logfile import RunLog

_TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "epoch", "tokens_seen", "real_tokens_seen", "supervised_tokens_seen")


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated when on a GPU, else the process's peak resident memory."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def peak_reserved_mb() -> float | None:
    """Peak CUDA memory the caching allocator reserved (what nvidia-smi shows, less the context); None off CUDA."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return None


class LogCallback(TrainerCallback):
    """Writes trainer_log.jsonl.

    A fresh run starts a new log. A resumed run first drops the lines past the checkpoint it resumes
    from (rewriting the file atomically), so every step appears once; its elapsed / remaining time
    and throughput count only this process's steps and tokens, so a resume fakes no speed.
    `resumed_from` / `tokens_at_start`: the checkpoint a resumed run starts from and the real tokens counted up to it.
    """

    def __init__(self, resumed_from: str | None = None, tokens_at_start: int = 0) -> None:
        self.path: Path | None = None
        self.start_time = 0.0
        self.start_step = 0
        self.resumed_from = resumed_from
        self.tokens_at_start = tokens_at_start
        self.status = "finished"
        self.last_loss: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.path = Path(args.output_dir) / TRAINER_LOG
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if state.global_step == 0:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            self._drop_lines_after(state.global_step)
        self.start_time, self.start_step = time.time(), state.global_step
        # pid and host let the board tell a live run from one that was killed without a last line
        self.write(state, "train_begin", resumed_from=self.resumed_from, world_size=args.world_size,
                   pid=os.getpid(), host=socket.gethostname())

    def _drop_lines_after(self, step: int) -> None:
        assert self.path is not None  # set by on_train_begin, the only caller
        kept = [line for line in RunLog(self.path).refresh() if line.get("current_steps", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(line, ensure_ascii=False, default=str) + "\n" for line in kept))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.path is None:
            return
        logs = dict(logs or {})
        if "train_runtime" in logs:
            self.last_loss = logs.get("train_loss")
            status = self.status if self.status != "finished" or state.global_step >= state.max_steps else "stopped_early"
            # `loss` stays None: it belongs to training-step lines (a plotter reading `loss` per line would
            # otherwise get the run's average as a spurious last point); the average is `train_loss`.
            self.write(state, "train_end", status=status, train_loss=logs.get("train_loss"),
                       **{k: logs.get(k) for k in _TRAIN_KEYS if k in logs and k != "loss"})
            return
        event = "eval" if any(k.startswith("eval_") for k in logs) else "log"
        fields = {k: logs.get(k) for k in _TRAIN_KEYS}
        if event == "eval":
            fields.update({k: v for k, v in logs.items() if k.startswith("eval_") or k == "reward"})
        else:  # a stage's own metrics too (rm: accuracy, margin; dpo: rewards/*)
            fields.update(logs)
        self.write(state, event, **fields)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.path is not None:
            self.write(state, "save", checkpoint=str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))

    def write(self, state: Any, event: str, **fields: Any) -> None:
        """Append one line; also used by `peftkit train` for the `error` event."""
        if self.path is None:
            return
        elapsed = time.time() - self.start_time if self.start_time else 0.0
        done = state.global_step - self.start_step
        remaining = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
        line = {
            "v": LOG_SCHEMA_VERSION,
            "event": event,
            "current_steps": state.global_step,
            "total_steps": state.max_steps,
            "loss": None,
            "eval_loss": None,
            "reward": None,
            "learning_rate": None,
            "grad_norm": None,
            "epoch": state.epoch,
            "percentage": round(100 * state.global_step / state.max_steps, 2) if state.max_steps else None,
            "elapsed_time": _clock(elapsed),
            "remaining_time": _clock(remaining) if remaining is not None else None,
            "elapsed_seconds": round(elapsed, 3),
            "remaining_seconds": round(remaining, 3) if remaining is not None else None,
            "peak_memory_mb": peak_memory_mb(),
            "time": round(time.time(), 3),
        }
        reserved = peak_reserved_mb()
        if reserved is not None:
            line["peak_reserved_mb"] = reserved
        line.update({k: v for k, v in fields.items() if v is not None or k not in line})
        if line.get("real_tokens_seen") is not None and elapsed > 0:
            line["tokens_per_second"] = round((line["real_tokens_seen"] - self.tokens_at_start) / elapsed, 1)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
            f.flush()


class StopCallback(TrainerCallback):
    """Turns a requested stop (SIGINT / SIGTERM) into: save a checkpoint at this step boundary, then stop."""

    def __init__(self, stop: Any, log: LogCallback) -> None:
        self.stop, self.log = stop, log

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop.agreed(args):
            control.should_save = True
            control.should_training_stop = True
            self.log.status = "interrupted"


class TimeBudget(TrainerCallback, ExportableState):
    """`train.max_train_minutes`: the step count chosen from this machine's measured rate, so a faster machine
    trains more steps in the same time instead of finishing early (as Ultralytics' `time` does for epochs).

    `max_steps` stays the upper bound. The seconds a step takes are measured from the end of step 1 (which pays
    for page faults and allocator warm-up) to the end of step `CALIBRATION`; the run then takes as many steps as
    the minutes left hold, and the learning-rate schedule is rebuilt for that total with transformers'
    `get_scheduler` (same type, warmup and kwargs), so it ends where it would have with that max_steps from the
    start: exactly so while calibration ends inside the warmup, and nearly so otherwise (the first steps ran on
    the longer horizon). The choice is kept in checkpoints (ExportableState; read back here, as transformers restores
    callback states only under restore_callback_states_from_checkpoint), so a resumed run keeps it. Every process
    of a distributed run takes rank 0's choice.
    """

    CALIBRATION = 6
    clock = staticmethod(time.perf_counter)  # a test's fake clock replaces it

    def __init__(self, minutes: float, chosen_steps: int | None = None) -> None:
        self.minutes, self.chosen_steps = minutes, chosen_steps
        self.start = self.first = 0.0
        self.begin = 0  # the step this process started at

    def state(self) -> dict[str, Any]:
        return {"args": {"minutes": self.minutes}, "attributes": {"chosen_steps": self.chosen_steps}}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start, self.begin = self.clock(), state.global_step
        if self.chosen_steps is None and state.global_step > 0:  # resumed: the choice the checkpoint holds
            kept = (state.stateful_callbacks or {}).get(type(self).__name__) or {}
            self.chosen_steps = (kept[0] if isinstance(kept, list) else kept).get("attributes", {}).get("chosen_steps")
        if self.chosen_steps is not None:
            self._apply(args, state, kwargs, self.chosen_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.chosen_steps is not None:
            return
        done = state.global_step - self.begin
        if done == 1:
            self.first = self.clock()
        elif done == self.CALIBRATION or state.global_step >= state.max_steps:
            now = self.clock()
            per_step = (now - self.first) / max(done - 1, 1)
            left = self.minutes * 60 - (now - self.start)
            steps = _agreed(min(state.max_steps, state.global_step + max(int(left / per_step), 0)))
            self._apply(args, state, kwargs, steps)
            if state.is_world_process_zero:
                print(f"[peftkit] train.max_train_minutes={self.minutes:g}: {per_step:.2f} s a step over steps "
                      f"{self.begin + 2}-{state.global_step}, so {steps} steps (max_steps {args.max_steps})", flush=True)
            if state.global_step >= steps:
                control.should_training_stop = True

    def _apply(self, args: Any, state: Any, kwargs: dict[str, Any], steps: int) -> None:
        from transformers import get_scheduler

        self.chosen_steps = state.max_steps = steps
        scheduler = kwargs.get("lr_scheduler")
        if scheduler is None or not hasattr(scheduler, "lr_lambdas"):
            return  # not a LambdaLR (every transformers schedule is one): its horizon stays max_steps
        import torch

        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        fitted = get_scheduler(args.lr_scheduler_type, probe, num_warmup_steps=args.get_warmup_steps(steps),
                               num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
        scheduler.lr_lambdas = fitted.lr_lambdas * len(scheduler.lr_lambdas)
        scheduler.last_epoch -= 1  # the rate of the next step, from the fitted schedule
        scheduler.step()


def _agreed(steps: int) -> int:
    """Rank 0's step count on every process (each measured its own rate; they must stop together)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return steps
    import torch

    value = torch.tensor([steps], dtype=torch.long,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(value, src=0)
    return int(value.item())


class TrackerConfig(TrainerCallback):
    """Adds peftkit's resolved config (stage, data, finetuning, eval: what TrainingArguments do not hold) to
    the trackers of `train.report_to`; transformers' own integrations log the rest (metrics, TrainingArguments).

    Runs after them (integrations are Trainer's first callbacks), so their run exists.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        trackers = set(args.report_to or []) | set(tracker_list(self.config.get("train", {})))
        if "swanlab" in trackers:
            import swanlab

            if swanlab.get_run() is not None:
                swanlab.config.update({"peftkit": self.config})
        if "wandb" in trackers:
            import wandb

            if wandb.run is not None:
                wandb.config.update({"peftkit": self.config}, allow_val_change=True)
        if "mlflow" in trackers:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_dict(self.config, "peftkit_config.yaml")


def swanlab_callback(run_name: str) -> Any:
    """SwanLab's own transformers callback (swanlab.integration.transformers) for `train.report_to: swanlab`.

    transformers 5.24's built-in SwanLabCallback calls swanlab.get_run() before swanlab.init(), which
    swanlab 0.9.8 and 0.10.3 answer with "No active Run", stopping the run at its first step (measured);
    SwanLab's own callback initialises first. The mode is SwanLab's: SWANLAB_MODE=online | local | offline.
    """
    from swanlab.integration.transformers import SwanLabCallback

    return SwanLabCallback(experiment_name=run_name)
