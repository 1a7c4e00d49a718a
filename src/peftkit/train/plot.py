"""Draw training_loss.png (raw and smoothed loss, eval loss if any) from trainer_log.jsonl."""

from __future__ import annotations

import os
from pathlib import Path

from peftkit.constants import LOSS_PLOT
from peftkit.train.logfile import read_log


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard draws it."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_loss(output_dir: str | Path) -> Path | None:
    """Write training_loss.png; None when the log has no loss yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(Path(output_dir))
    train = [(r["current_steps"], r["loss"]) for r in rows if r.get("event") == "log" and r.get("loss") is not None]
    evals = [(r["current_steps"], r["eval_loss"]) for r in rows if r.get("event") == "eval"]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#1f77b4", alpha=0.35, label="loss")
        ax.plot(steps, smooth(list(losses)), color="#1f77b4", label="loss (smoothed)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="#d62728", label="eval_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss of {Path(output_dir).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    target = Path(output_dir) / LOSS_PLOT
    tmp = target.with_name(f".{target.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, target)
    return target
