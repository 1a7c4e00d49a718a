"""The losses of the preference stages, each computed from one batch of (chosen, rejected) pairs.

A batch holds 2B rows, the B chosen sequences first (data/collate.py: PairCollator), so each
objective runs one forward for both sides. An objective returns the loss, the metrics to log, and
a (B, 2) tensor of per-pair scores (chosen, rejected) from which evaluation computes the same
metrics over a whole eval set.

Why not TRL's DPOTrainer: it tokenizes with its own pipeline, saves with its own rules and is not a
Seq2SeqTrainer, so using it would bypass peftkit's data engine (templates, masks, truncation,
cache, report), PeftTrainer's saving and the LogCallback; the loss itself is a few lines.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from peftkit.constants import IGNORE_INDEX
from peftkit.data.collate import chosen_and_rejected
from peftkit.model.value_head import causal_lm, scores, value_head
from peftkit.train.loss import hidden_states_as_logits


def sequence_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Sum of the log-probabilities of each row's supervised tokens, and their count."""
    import torch

    labels = labels[:, 1:]
    logits = logits[:, :-1].float()
    mask = labels != IGNORE_INDEX
    picked = torch.gather(logits, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = picked - torch.logsumexp(logits, dim=-1)
    return (per_token * mask).sum(-1), mask.sum(-1)


def pair_metrics(chosen: Any, rejected: Any, names: dict[str, str]) -> dict[str, float]:
    """accuracy (share of pairs with chosen > rejected), mean margin, mean chosen and rejected."""
    return {
        names["accuracy"]: float((chosen > rejected).float().mean()),
        names["margin"]: float((chosen - rejected).mean()),
        names["chosen"]: float(chosen.mean()),
        names["rejected"]: float(rejected.mean()),
    }


class PairwiseReward:
    """rm: −log σ(r_chosen − r_rejected); r is the value head's score at the last non-padding token."""

    names = {"accuracy": "accuracy", "margin": "margin", "chosen": "score_chosen", "rejected": "score_rejected"}

    def __call__(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, float], Any]:
        import torch

        lm = causal_lm(model)
        with hidden_states_as_logits(lm):  # the LM head's vocabulary logits are never computed
            hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        r = scores(hidden, inputs["attention_mask"], value_head(lm))
        chosen, rejected = chosen_and_rejected(r)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        return loss, pair_metrics(chosen.detach(), rejected.detach(), self.names), torch.stack([chosen, rejected], -1)


class DirectPreference:
    """dpo, sigmoid loss: −log σ(β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]).

    The reference is the same model with its LoRA adapter disabled (no second copy in memory), or
    for freeze / full tuning a frozen copy taken before training. `ftx` adds that times the SFT loss
    (mean negative log-likelihood per token) of the chosen answers.
    """

    names = {"accuracy": "rewards/accuracies", "margin": "rewards/margins", "chosen": "rewards/chosen",
             "rejected": "rewards/rejected"}

    def __init__(self, beta: float, ftx: float = 0.0, reference: Any = None) -> None:
        self.beta, self.ftx = beta, ftx
        self.reference = reference  # None: the trained model with its adapter disabled

    def _reference_logps(self, model: Any, inputs: dict[str, Any]) -> Any:
        import torch

        with torch.no_grad():
            if self.reference is None:
                peft_model = getattr(model, "module", model)  # not the DDP wrapper
                with peft_model.disable_adapter():
                    logits = peft_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                        use_cache=False).logits
            else:
                device = inputs["input_ids"].device
                if next(self.reference.parameters()).device != device:
                    self.reference.to(device)
                logits = self.reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                        use_cache=False).logits
            return sequence_logps(logits, inputs["labels"])[0]

    def __call__(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, float], Any]:
        import torch

        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        logps, counts = sequence_logps(logits, inputs["labels"])
        del logits
        ref = self._reference_logps(model, inputs)
        chosen, rejected = chosen_and_rejected(self.beta * (logps - ref))
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        chosen_logps, _ = chosen_and_rejected(logps)
        if self.ftx:
            loss = loss + self.ftx * (-chosen_logps / chosen_and_rejected(counts)[0].clamp(min=1)).mean()
        metrics = pair_metrics(chosen.detach(), rejected.detach(), self.names)
        metrics["logps/chosen"], metrics["logps/rejected"] = (float(x.detach().mean()) for x in chosen_and_rejected(logps))
        return loss, metrics, torch.stack([chosen, rejected], -1).detach()


def _frozen_copy(model: Any) -> Any:
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


# The stage table's objectives (peftkit/stages.py): (model, FinetuningArgs, reference) -> the loss;
# `reference` builds the frozen reference model when one is needed.
def pairwise_reward(model: Any, finetuning: Any, reference: Callable[[], Any]) -> PairwiseReward:
    return PairwiseReward()


def direct_preference(model: Any, finetuning: Any, reference: Callable[[], Any]) -> DirectPreference:
    """The reference is the adapter switched off where there is one (no second copy of the model)."""
    ref = None if hasattr(model, "disable_adapter") else reference()
    return DirectPreference(finetuning.pref_beta, finetuning.pref_ftx, ref)


def build_objective(stage: str, model: Any, finetuning: Any = None,
                    reference: Callable[[], Any] | None = None) -> Any | None:
    """The loss of the stage's objective; None for stages whose model computes its own (sft, pt, cls).

    `reference` defaults to a frozen copy of `model` as it is now (before training).
    """
    from peftkit.config.schema import FinetuningArgs
    from peftkit.stages import stage as stage_of

    entry = stage_of(stage)
    if entry.objective is None:
        return None
    return entry.load("objective")(model, finetuning or FinetuningArgs(), reference or (lambda: _frozen_copy(model)))


def pair_eval_metrics(names: dict[str, str]) -> Any:
    """compute_metrics for Trainer evaluation over the (chosen, rejected) scores of every eval pair."""
    def compute(eval_pred: Any) -> dict[str, float]:
        import torch

        pairs = torch.as_tensor(eval_pred.predictions)
        return {k: round(v, 6) for k, v in pair_metrics(pairs[:, 0], pairs[:, 1], names).items()}

    return compute
