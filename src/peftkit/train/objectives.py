"""The stage table's grpo objective and Trainer's compute_metrics for a stage's objective (train-side: grpo samples
with the generation engine and scores with train's reward functions)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peftkit.objectives.build import _reference
from peftkit.train.grpo import GroupRelative, engine_sampler


def group_relative(model: Any, cfg: Any, reference: Callable[[], Any], tokenizer: Any) -> GroupRelative:
    """The reference only with a KL penalty (grpo.beta > 0)."""
    from peftkit.errors import ConfigError
    from peftkit.train.rewards import build_rewards

    rewards, issues = build_rewards(cfg.grpo.rewards)
    if issues:
        raise ConfigError(issues)
    return GroupRelative(tokenizer, cfg.grpo, rewards, engine_sampler(tokenizer, cfg.grpo),
                         _reference(model, reference, cfg.grpo.beta > 0))


def eval_metrics(objective: Any) -> Any:
    """compute_metrics for Trainer evaluation: the objective's summary over the scores of the whole eval set."""
    def compute(eval_pred: Any) -> dict[str, float]:
        import torch

        return {k: round(v, 6) for k, v in objective.summary(torch.as_tensor(eval_pred.predictions)).items()}

    return compute
