"""Which checkpoints exist, which one to resume from, and whether an output_dir may be written.

transformers writes `checkpoint-N` in place (it fixes the folder name before writing, and records it
for load_best_model_at_end and rotation); PeftTrainer adds a completion marker as the very last
write. A folder without the marker is a write that was killed: it is never resumed from and is
removed before training continues.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from peftkit.config.schema import TrainExtras
from peftkit.constants import (
    COMPLETE_MARKER,
    PREDICT_RESULTS_FILE,
    PREDICTIONS_FILE,
    RUN_SUMMARY_FILE,
    TRAINER_LOG,
)
from peftkit.errors import PeftkitError

logger = logging.getLogger("peftkit")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every checkpoint folder, by step."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p, (p / COMPLETE_MARKER).is_file()))
    return sorted(found)


def latest_complete(output_dir: Path) -> Path | None:
    complete = [p for _, p, ok in checkpoints(output_dir) if ok]
    return complete[-1] if complete else None


# What a finished run leaves (besides checkpoints): a fresh run must not silently replace them.
FINISHED_RUN_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", RUN_SUMMARY_FILE)
# Written by a run; removed with train.overwrite_output_dir so no stale file mixes with the new run's.
_RUN_FILES = (*FINISHED_RUN_FILES, TRAINER_LOG, "adapter_config.json", PREDICTIONS_FILE, PREDICT_RESULTS_FILE,
              PREDICTIONS_FILE.replace(".jsonl", "_before.jsonl"), PREDICT_RESULTS_FILE.replace(".json", "_before.json"))


def resolve_resume(output_dir: Path, extras: TrainExtras, resume_command: str) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    Refuses (naming `resume_command` and train.overwrite_output_dir) to start over in a folder that
    holds checkpoints or a finished run; with overwrite_output_dir, removes exactly those.
    """
    existing = checkpoints(output_dir)
    finished = [n for n in FINISHED_RUN_FILES if (Path(output_dir) / n).exists()]
    resume = extras.resume_from_checkpoint
    if resume is True:
        target = _latest_to_resume(output_dir, finished, extras)
    elif isinstance(resume, str) and resume:
        target = _named_checkpoint(resume)
    else:
        target = None
        _start_over(output_dir, existing, finished, extras, resume_command)
    _remove_interrupted(existing)
    return target


def _latest_to_resume(output_dir: Path, finished: list[str], extras: TrainExtras) -> Path | None:
    """resume_from_checkpoint: true — the latest complete one, or a fresh start if that replaces no finished run."""
    target = latest_complete(output_dir)
    if target is None and finished and not extras.overwrite_output_dir:
        raise PeftkitError(f"{output_dir} holds a finished run ({', '.join(finished)}) and no checkpoint to "
                           "resume from; choose another train.output_dir, or start over with "
                           "train.overwrite_output_dir=true (deletes it)")
    if target is None:
        logger.info("resume_from_checkpoint: no complete checkpoint in %s, starting fresh", output_dir)
    return target


def _named_checkpoint(resume: str) -> Path:
    """resume_from_checkpoint: a path — accepted only with its completion marker (a killed write is never resumed)."""
    target = Path(resume)
    if not (target / COMPLETE_MARKER).is_file():
        raise PeftkitError(f"train.resume_from_checkpoint={resume!r}: not a complete peftkit checkpoint "
                           f"(no {COMPLETE_MARKER}: missing, or its write was interrupted); "
                           "use train.resume_from_checkpoint=true for the latest complete one")
    return target


def _start_over(output_dir: Path, existing: list[tuple[int, Path, bool]], finished: list[str], extras: TrainExtras,
                resume_command: str) -> None:
    """A fresh run: refuse to replace a previous one unless overwrite_output_dir, which then deletes exactly its files."""
    if existing and not extras.overwrite_output_dir:
        raise PeftkitError(
            f"{output_dir} already holds checkpoints ({', '.join(p.name for _, p, _ in existing)}). Resume with "
            f"`{resume_command}`, or start over with train.overwrite_output_dir=true (deletes them)"
        )
    if finished and not extras.overwrite_output_dir:
        raise PeftkitError(
            f"{output_dir} already holds a finished run ({', '.join(finished)}); choose another "
            "train.output_dir, or start over with train.overwrite_output_dir=true (deletes it)"
        )
    if extras.overwrite_output_dir and (existing or finished):
        for _, p, _ in existing:
            shutil.rmtree(p)
        for name in _RUN_FILES:
            (Path(output_dir) / name).unlink(missing_ok=True)
        logger.info("overwrite_output_dir: deleted the previous run in %s (%d checkpoint(s))", output_dir,
                    len(existing))


def _remove_interrupted(existing: list[tuple[int, Path, bool]]) -> None:
    """Delete checkpoints without a completion marker (killed writes), so no later run resumes from one."""
    for _, p, ok in existing:
        if not ok and p.exists():
            logger.warning("removing %s: its write was interrupted (no completion marker)", p)
            shutil.rmtree(p)


# Keys that may differ between a run and its resumption: how to resume, and where (the board passes an absolute path).
_RESUME_KEYS = {"train.resume_from_checkpoint", "train.overwrite_output_dir", "train.output_dir"}


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two resolved configs, resume keys aside."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b and name not in _RESUME_KEYS:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
