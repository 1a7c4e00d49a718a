"""What a run needs beyond a valid config, checked before any work: the checks that know more than config may import
(quantization on this machine and this checkpoint, the reward functions, the model family's limits), reported
together as one ConfigError (exit 2). config/validate.py checks the config's own values; this runs at train's start."""

from __future__ import annotations

from peftkit.config.schema import RunConfig
from peftkit.errors import ConfigError
from peftkit.stages import stage as stage_of


def preflight(cfg: RunConfig) -> None:
    """Every problem the run would meet before its first step, or nothing."""
    from peftkit.model.loading import check_family
    from peftkit.model.quantization import check_quantization
    from peftkit.train.rewards import build_rewards

    entry = stage_of(cfg.stage)
    issues = check_quantization(cfg.model, cfg.finetuning.finetuning_type)
    if entry.rewards and cfg.grpo.rewards:  # none at all: config/validate.py says so
        issues += build_rewards(cfg.grpo.rewards)[1]
    if issues:
        raise ConfigError(issues)
    check_family(cfg.model, packing=cfg.data.packing and entry.packing)  # reads the model's config.json
