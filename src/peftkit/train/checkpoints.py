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
from peftkit.constants import CHECKPOINT_MARKER, TRAINER_LOG
from peftkit.errors import PeftkitError

logger = logging.getLogger("peftkit")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every checkpoint folder, by step."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p, (p / CHECKPOINT_MARKER).is_file()))
    return sorted(found)


def latest_complete(output_dir: Path) -> Path | None:
    complete = [p for _, p, ok in checkpoints(output_dir) if ok]
    return complete[-1] if complete else None


def resolve_resume(output_dir: Path, extras: TrainExtras, config_hint: str) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite checkpoints by accident."""
    existing = checkpoints(output_dir)
    resume = extras.resume_from_checkpoint
    if resume is True:
        target = latest_complete(output_dir)
        if target is None:
            logger.info("resume_from_checkpoint: no complete checkpoint in %s, starting fresh", output_dir)
    elif isinstance(resume, str) and resume:
        target = Path(resume)
        if not (target / CHECKPOINT_MARKER).is_file():
            raise PeftkitError(f"train.resume_from_checkpoint={resume!r}: not a complete peftkit checkpoint "
                               f"(no {CHECKPOINT_MARKER}: missing, or its write was interrupted); "
                               "use train.resume_from_checkpoint=true for the latest complete one")
    else:
        target = None
        if existing and not extras.overwrite_output_dir:
            raise PeftkitError(
                f"{output_dir} already holds checkpoints ({', '.join(p.name for _, p, _ in existing)}). Resume with "
                f"`peftkit train {config_hint} train.resume_from_checkpoint=true`, or start over with "
                "train.overwrite_output_dir=true (deletes them)"
            )
        if existing:
            for _, p, _ in existing:
                shutil.rmtree(p)
            (Path(output_dir) / TRAINER_LOG).unlink(missing_ok=True)
            logger.info("overwrite_output_dir: deleted %d old checkpoint(s) in %s", len(existing), output_dir)
    for _, p, ok in existing:
        if not ok and p.exists():
            logger.warning("removing %s: its write was interrupted (no completion marker)", p)
            shutil.rmtree(p)
    return target
