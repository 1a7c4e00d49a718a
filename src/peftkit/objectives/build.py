"""Which objective a stage trains (and evaluation scores) with: build_objective and the stage table's factories of
the rm / dpo / kto objectives, with the reference model each needs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from peftkit.objectives.pairs import REFERENCE_FREE, DirectPreference, PairwiseReward
from peftkit.objectives.unpaired import Unpaired


def _frozen_copy(model: Any) -> Any:
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


# The stage table's objectives (peftkit/stages.py): (model, RunConfig, reference, tokenizer) -> the loss;
# `reference` builds the frozen reference model when one is needed (freeze / full tuning: no adapter to disable).
def pairwise_reward(model: Any, cfg: Any, reference: Callable[[], Any], tokenizer: Any) -> PairwiseReward:
    """Its scores pass the output layer through (libraries.py: TOUCH_POINTS), said outside the tested versions."""
    from peftkit.libraries import warn_untested

    warn_untested("stage rm: the value head reads hidden states through the output layer's pass-through",
                  ("transformers",))
    return PairwiseReward()


def _reference(model: Any, reference: Callable[[], Any], needed: bool = True) -> Any:
    """None where the adapter can be switched off (no second copy of the model) or no reference is needed."""
    return reference() if needed and not hasattr(model, "disable_adapter") else None


def direct_preference(model: Any, cfg: Any, reference: Callable[[], Any], tokenizer: Any) -> DirectPreference:
    """No reference model at all for the reference-free losses (orpo, simpo)."""
    ft = cfg.finetuning
    return DirectPreference(ft.pref_beta, ft.pref_ftx, _reference(model, reference, ft.pref_loss not in REFERENCE_FREE),
                            ft.pref_loss, ft.simpo_gamma)


def unpaired_preference(model: Any, cfg: Any, reference: Callable[[], Any], tokenizer: Any) -> Unpaired:
    ft = cfg.finetuning
    return Unpaired(ft.pref_beta, ft.kto_desirable_weight, ft.kto_undesirable_weight, _reference(model, reference))


def build_objective(stage: str, model: Any, cfg: Any = None, reference: Callable[[], Any] | None = None,
                    tokenizer: Any = None) -> Any | None:
    """The loss of the stage's objective; None for stages whose model computes its own (sft, pt, cls).

    `cfg` (a RunConfig) defaults to peftkit's defaults; `reference` to a frozen copy of `model` as it is now
    (before training).
    """
    from peftkit.config.schema import RunConfig
    from peftkit.stages import stage as stage_of

    entry = stage_of(stage)
    if entry.objective is None:
        return None
    return entry.load("objective")(model, cfg or RunConfig(), reference or (lambda: _frozen_copy(model)), tokenizer)
