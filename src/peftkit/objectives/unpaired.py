"""kto's objective: unpaired desirable / undesirable answers against a KL reference point."""

from __future__ import annotations

from typing import Any

from peftkit.objectives.pairs import reference_logps, sequence_logps


def kto_losses(logps: Any, ref_logps: Any, kl_logps: Any, kl_ref_logps: Any, desirable: Any, beta: float,
               weights: tuple[float, float] = (1.0, 1.0)) -> tuple[Any, Any]:
    """Per-example KTO loss and the KL reference point z (see Unpaired) from summed log-probabilities."""
    import torch

    ratio = logps - ref_logps
    kl = (kl_logps - kl_ref_logps).mean().clamp(min=0).detach()
    losses = torch.where(desirable.bool(), weights[0] * (1 - torch.sigmoid(beta * (ratio - kl))),
                         weights[1] * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, kl


class Unpaired:
    """kto (Ethayarajh et al. 2024, as TRL computes it): per example, with r = log π(y|x) − log π_ref(y|x),
    desirable: w_d·(1 − σ(β(r − z))), undesirable: w_u·(1 − σ(β(z − r))), where z, the KL reference point,
    is the batch mean of r over mismatched (prompt, answer) rows, clamped at 0 and not differentiated.

    Batches come from UnpairedCollator: B judged rows, then B mismatched rows, and `desirable` (B,).
    Scores are (β·r, desirable) per example.
    """

    reward_key = "rewards/margins"

    def __init__(self, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference: Any = None) -> None:
        self.beta, self.weights = beta, (desirable_weight, undesirable_weight)
        self.reference = reference  # None: the trained model with its adapter disabled

    def __call__(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, float], Any]:
        import torch

        n = len(inputs["desirable"])
        rows = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        logits = model(**{k: v[:n] for k, v in rows.items()}, use_cache=False).logits
        logps = sequence_logps(logits, inputs["labels"][:n])[0]
        del logits
        with torch.no_grad():
            kl_logps = sequence_logps(model(**{k: v[n:] for k, v in rows.items()}, use_cache=False).logits,
                                      inputs["labels"][n:])[0]
        ref = reference_logps(model, self.reference, inputs)
        losses, kl = kto_losses(logps, ref[:n], kl_logps, ref[n:], inputs["desirable"], self.beta, self.weights)
        scores = torch.stack([self.beta * (logps - ref[:n]).detach(), inputs["desirable"].float()], -1)
        metrics = self.summary(scores)
        metrics["kl"] = float(kl)
        return losses.mean(), metrics, scores

    def summary(self, scores: Any) -> dict[str, float]:
        """Mean reward of the desirable and of the undesirable examples, and their difference."""
        rewards, desirable = scores[:, 0], scores[:, 1].bool()
        out = {}
        if desirable.any():
            out["rewards/chosen"] = float(rewards[desirable].mean())
        if (~desirable).any():
            out["rewards/rejected"] = float(rewards[~desirable].mean())
        if len(out) == 2:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
