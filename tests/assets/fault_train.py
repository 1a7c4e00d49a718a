"""Run `peftkit train` with one fault injected, for tests/unit/test_lifecycle.py.

python tests/assets/fault_train.py FAULT CONFIG [overrides...]
FAULT: none | kill_in_step:N (SIGKILL while computing step N) | kill_in_save:N (SIGKILL while checkpoint-N
is being written, after its weights) | term_in_step:N (SIGTERM while computing step N) | nan_at:N (the loss of
step N is NaN).
"""

import os
import signal
import sys

from peftkit.cli import main
from peftkit.train.trainer import PeftTrainer

fault, _, at = sys.argv[1].partition(":")
step = int(at or 0)
step_of = lambda self: self.state.global_step + 1  # noqa: E731 - the step being computed

if fault in ("kill_in_step", "term_in_step"):
    real_step = PeftTrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        if step_of(self) == step:
            os.kill(os.getpid(), signal.SIGKILL if fault == "kill_in_step" else signal.SIGTERM)
        return real_step(self, model, inputs, num_items_in_batch)

    PeftTrainer.training_step = training_step
elif fault == "nan_at":
    real_loss = PeftTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = real_loss(self, model, inputs, *args, **kwargs)
        if step_of(self) == step:
            loss = loss * float("nan") if not isinstance(loss, tuple) else (loss[0] * float("nan"), *loss[1:])
        return loss

    PeftTrainer.compute_loss = compute_loss
elif fault == "kill_in_save":
    real_save = PeftTrainer._save_optimizer_and_scheduler

    def save_optimizer(self, output_dir):
        real_save(self, output_dir)
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    PeftTrainer._save_optimizer_and_scheduler = save_optimizer

sys.exit(main(["train", *sys.argv[2:]]))
