"""The pair objectives (rm, dpo) and the log-probabilities they share with kto and grpo, from one batch of
(chosen, rejected) pairs; below train, so evaluation scores with them without importing the trainer.

A batch holds 2B rows, the B chosen sequences first (data/collate.py: PairCollator), so each
objective runs one forward for both sides. An objective returns the loss, the metrics to log, and
a (B, 2) tensor of per-pair scores (chosen, rejected) from which evaluation computes the same
metrics over a whole eval set.

Why not TRL's DPOTrainer: it tokenizes with its own pipeline, saves with its own rules and is not a
Seq2SeqTrainer, so using it would bypass peftkit's data engine (templates, masks, truncation,
cache, report), PeftTrainer's saving and the LogCallback; the loss itself is a few lines.
"""

from __future__ import annotations

from typing import Any

from peftkit.constants import IGNORE_INDEX
from peftkit.data.collate import chosen_and_rejected
from peftkit.model.value_head import causal_lm, hidden_states_as_logits, scores, value_head


def token_logps(logits: Any, ids: Any) -> Any:
    """log p(ids[t]) under logits[t], per position (no shift: the caller aligns them)."""
    import torch

    logits = logits.float()
    picked = torch.gather(logits, 2, ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Sum of the log-probabilities of each row's supervised tokens, and their count."""
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return (token_logps(logits[:, :-1], labels) * mask).sum(-1), mask.sum(-1)


def pair_metrics(chosen: Any, rejected: Any, names: dict[str, str]) -> dict[str, float]:
    """accuracy (share of pairs with chosen > rejected), mean margin, mean chosen and rejected."""
    return {
        names["accuracy"]: float((chosen > rejected).float().mean()),
        names["margin"]: float((chosen - rejected).mean()),
        names["chosen"]: float(chosen.mean()),
        names["rejected"]: float(rejected.mean()),
    }


class PairScores:
    """An objective whose scores are (chosen, rejected) per pair; `names` says what its metrics are called."""

    names: dict[str, str]

    @property
    def reward_key(self) -> str:
        """The metric trainer_log.jsonl's `reward` field takes: the mean margin."""
        return self.names["margin"]

    def summary(self, scores: Any) -> dict[str, float]:
        """The metrics of a whole eval set from every pair's scores (Trainer evaluation and `peftkit eval`)."""
        return pair_metrics(scores[:, 0], scores[:, 1], self.names)


class PairwiseReward(PairScores):
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


PREF_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")  # no reference model is built or run for these


def pair_losses(kind: str, beta: float, logps: Any, counts: Any, ref_logps: Any = None,
                gamma: float = 0.5) -> tuple[Any, Any, dict[str, Any]]:
    """Per-pair loss, the (B, 2) implicit rewards (chosen, rejected) and extra per-pair metrics, for one
    `finetuning.pref_loss`, from the summed log-probabilities of 2B rows (chosen first) and their token counts.

    sigmoid (DPO): −log σ(β·Δ), Δ = [log π(c) − log π_ref(c)] − [log π(r) − log π_ref(r)]; rewards β·log(π/π_ref).
    hinge (SLiC):  max(0, 1 − β·Δ).
    ipo:           (Δ̄ − 1/(2β))², Δ̄ as Δ over per-token mean log-probabilities (as TRL and LLaMA-Factory).
    simpo:         −log σ(β·(l̄(c) − l̄(r)) − γ), l̄ the per-token mean log-probability; no reference; rewards β·l̄.
    orpo:          −l̄(c) + β·(−log σ(log odds(c) − log odds(r))), odds(p) = p / (1 − p) of p = exp(l̄); β is
                   the paper's λ (as TRL and LLaMA-Factory); no reference; rewards β·l̄.
    """
    import torch
    import torch.nn.functional as F

    mean = logps / counts.clamp(min=1)
    extra: dict[str, Any] = {}
    if kind in REFERENCE_FREE:
        c, r = chosen_and_rejected(mean)
        if kind == "simpo":
            loss = -F.logsigmoid(beta * (c - r) - gamma)
        else:
            log_odds = (c - r) - (torch.log1p(-torch.exp(c).clamp(max=1 - 1e-6)) -
                                  torch.log1p(-torch.exp(r).clamp(max=1 - 1e-6)))
            ratio = F.logsigmoid(log_odds)
            loss = -c - beta * ratio
            extra = {"log_odds_ratio": ratio, "log_odds_chosen": log_odds, "nll_loss": -c}
        return loss, torch.stack([beta * c, beta * r], -1), extra
    if ref_logps is None:
        raise ValueError(f"pref_loss {kind} needs the reference model's log-probabilities")
    if kind == "ipo":
        ratios = mean - ref_logps / counts.clamp(min=1)
        c, r = chosen_and_rejected(ratios)
        loss = (c - r - 1 / (2 * beta)) ** 2
        return loss, torch.stack([beta * c, beta * r], -1), extra
    c, r = chosen_and_rejected(logps - ref_logps)
    delta = beta * (c - r)
    loss = -F.logsigmoid(delta) if kind == "sigmoid" else torch.relu(1 - delta)
    return loss, torch.stack([beta * c, beta * r], -1), extra


class DirectPreference(PairScores):
    """dpo: one of PREF_LOSSES (pair_losses) over the policy's and, where the loss has one, the reference's
    log-probabilities of each pair.

    The reference is the same model with its LoRA adapter disabled (no second copy in memory), or
    for freeze / full tuning a frozen copy taken before training. `ftx` adds that times the SFT loss
    (mean negative log-likelihood per token) of the chosen answers.
    """

    names = {"accuracy": "rewards/accuracies", "margin": "rewards/margins", "chosen": "rewards/chosen",
             "rejected": "rewards/rejected"}

    def __init__(self, beta: float, ftx: float = 0.0, reference: Any = None, loss: str = "sigmoid",
                 gamma: float = 0.5) -> None:
        self.beta, self.ftx, self.loss, self.gamma = beta, ftx, loss, gamma
        self.reference = reference  # None: the trained model with its adapter disabled

    def _reference_logps(self, model: Any, inputs: dict[str, Any]) -> Any:
        if self.loss in REFERENCE_FREE:
            return None
        return reference_logps(model, self.reference, inputs)

    def __call__(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, float], Any]:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        logps, counts = sequence_logps(logits, inputs["labels"])
        del logits
        losses, rewards, extra = pair_losses(self.loss, self.beta, logps, counts, self._reference_logps(model, inputs),
                                             self.gamma)
        loss = losses.mean()
        chosen_logps, rejected_logps = chosen_and_rejected(logps)
        if self.ftx:
            loss = loss + self.ftx * (-chosen_logps / chosen_and_rejected(counts)[0].clamp(min=1)).mean()
        metrics = pair_metrics(rewards[:, 0].detach(), rewards[:, 1].detach(), self.names)
        metrics["logps/chosen"], metrics["logps/rejected"] = float(chosen_logps.detach().mean()), float(
            rejected_logps.detach().mean())
        metrics.update({k: float(v.detach().mean()) for k, v in extra.items()})
        return loss, metrics, rewards.detach()


def reference_logits(model: Any, reference: Any, **inputs: Any) -> Any:
    """The reference's logits, without gradient: `reference` when given, else `model` with its adapter disabled."""
    import torch

    with torch.no_grad():
        if reference is None:
            peft_model = getattr(model, "module", model)  # not the DDP wrapper
            with peft_model.disable_adapter():
                return peft_model(**inputs, use_cache=False).logits
        device = inputs["input_ids"].device
        if next(reference.parameters()).device != device:
            reference.to(device)
        return reference(**inputs, use_cache=False).logits


def reference_logps(model: Any, reference: Any, inputs: dict[str, Any]) -> Any:
    """Summed log-probabilities of each row's supervised tokens under the reference (see reference_logits)."""
    logits = reference_logits(model, reference, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return sequence_logps(logits, inputs["labels"])[0]
