"""What a run has trained on, over every process: tokens fed / real / supervised, and the first
non-finite loss; saved into each checkpoint with its completion marker, which is the checkpoint's last write.

The trainer hands each step's batch and loss to `Progress.observe`; everything else happens at
logging and saving steps, where transformers synchronises with the device anyway: counting and the
finiteness check stay on the device, so a step costs no extra host sync on a GPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from peftkit.atomic import write_json_atomic
from peftkit.constants import CHECKPOINT_STATE_FILE, COMPLETE_MARKER, IGNORE_INDEX
from peftkit.errors import PeftkitError


class TrainingDiverged(PeftkitError):
    """The loss became NaN or infinite."""


@dataclass
class TokenCounts:
    """Tokens trained on, over every process, since step 0 (restored on resume)."""

    tokens: int = 0  # fed to the model, padding included
    real_tokens: int = 0  # without padding
    supervised_tokens: int = 0  # with a label (the ones the loss is over)

    def add(self, other: TokenCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def count_tokens(inputs: dict[str, Any], pad_token_id: int | None) -> Any:
    """(fed, real, supervised) tokens of one batch, as a tensor on the batch's device."""
    import torch

    ids, labels = inputs["input_ids"], inputs.get("labels")
    fed = torch.tensor(ids.numel(), device=ids.device)
    if "attention_mask" in inputs:
        real = inputs["attention_mask"].sum()
    elif "position_ids" in inputs and labels is not None:  # packed rows: padding is the unlabelled tail
        pad = (ids == pad_token_id) & (labels == IGNORE_INDEX)
        real = fed - pad.flip(-1).int().cumprod(-1).sum()  # each row's run of padding at its end
    else:
        real = fed
    if labels is None:
        supervised = torch.zeros((), device=ids.device)
    elif labels.dim() == 1:  # cls: one class per record
        supervised = torch.tensor(labels.numel(), device=ids.device)
    else:
        supervised = (labels[:, 1:] != IGNORE_INDEX).sum()
    return torch.stack([fed, real, supervised]).long()


class Progress(TrainerCallback):
    """Token counts and the divergence check; writes each checkpoint's counts and completion marker."""

    def __init__(self, pad_token_id: int | None, resumed_from: Path | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.base = TokenCounts()  # every process, up to the checkpoint resumed from
        if resumed_from is not None and (Path(resumed_from) / CHECKPOINT_STATE_FILE).is_file():
            self.base = TokenCounts(**json.loads((Path(resumed_from) / CHECKPOINT_STATE_FILE).read_text(encoding="utf-8")))
        self._local: Any = None  # this process's (fed, real, supervised) since it started, on the device
        self._started = 0.0  # when this process's training began (throughput excludes a resumed run's past)
        self._first_bad: Any = None  # (step, loss) of the first non-finite loss (step 0: none), on the device

    def observe(self, inputs: dict[str, Any], loss: Any, step: int) -> None:
        """Count one training step's batch and remember whether its loss was finite (no host sync)."""
        import torch

        counts = count_tokens(inputs, self.pad_token_id)
        self._local = counts if self._local is None else self._local + counts
        loss = loss.detach().float().reshape(-1)[:1].squeeze()
        now = torch.stack([torch.tensor(float(step), device=loss.device), loss])
        if self._first_bad is None:
            self._first_bad = torch.zeros(2, device=loss.device)
        self._first_bad = torch.where(~torch.isfinite(loss) & (self._first_bad[0] == 0), now, self._first_bad)

    def totals(self, args: Any) -> TokenCounts:
        """Counts of every process since step 0 (an all-reduce when distributed: call it on every rank)."""
        import torch

        local = self._local if self._local is not None else torch.zeros(3, dtype=torch.long, device=args.device)
        if args.world_size > 1:
            import torch.distributed as dist

            local = local.to(args.device)
            dist.all_reduce(local)
        total = TokenCounts(*local.tolist())
        total.add(self.base)
        return total

    def log_values(self, args: Any) -> dict[str, float]:
        """What every logged line adds: the token counts since step 0 and this process's real tokens per
        second since it started (a resumed run's earlier tokens and time do not count)."""
        totals = asdict(self.totals(args))
        values: dict[str, float] = {f"{k}_seen": v for k, v in totals.items()}
        seconds = time.time() - self._started if self._started else 0.0
        if seconds > 0:
            values["tokens_per_second"] = round((totals["real_tokens"] - self.base.real_tokens) / seconds, 1)
        return values

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = time.time()

    def check_finite(self, args: Any) -> None:
        """Raise TrainingDiverged naming the first non-finite step and the last good checkpoint."""
        step, value = self._first_bad.tolist() if self._first_bad is not None else (0, 0.0)
        if step:
            from peftkit.train.checkpoints import latest_complete

            last = latest_complete(Path(args.output_dir))
            raise TrainingDiverged(
                f"the loss is {value} at step {int(step)}: training stopped. "
                + (f"The last good checkpoint is {last}. " if last else "No checkpoint was saved. ")
                + "Lower train.learning_rate, check the data (data_report.json), or use bf16 instead of fp16."
            )

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.check_finite(args)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.check_finite(args)  # before the final save, for steps after the last log

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.check_finite(args)  # a checkpoint after a diverged step is never marked complete
        totals = self.totals(args)  # every process takes part in the reduction
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json_atomic(folder / CHECKPOINT_STATE_FILE, asdict(totals))
            (folder / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
