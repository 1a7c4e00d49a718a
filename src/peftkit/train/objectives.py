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


def group_advantages(rewards: Any, group: int, scale: bool = True) -> Any:
    """Each reward minus its group's mean (the `group` answers to one prompt are adjacent), divided by the group's
    standard deviation (unbiased, + 1e-4) when `scale`."""
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def grpo_token_losses(logps: Any, old_logps: Any, advantages: Any, epsilon: float, beta: float = 0.0,
                      ref_logps: Any = None) -> tuple[Any, Any, Any]:
    """Per-token GRPO loss −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·KL, with ρ = π/π_old and KL the k3 estimator
    exp(ref − log π) − (ref − log π) − 1; also whether each token's ratio was clipped, and the KL (0 without β)."""
    import torch

    ratio = torch.exp(logps - old_logps)
    advantages = advantages.unsqueeze(-1)
    unclipped, clipped = ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages
    losses = -torch.min(unclipped, clipped)
    was_clipped = clipped < unclipped  # min took the clipped side: that token's gradient is cut
    kl = torch.zeros_like(logps)
    if beta and ref_logps is not None:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        losses = losses + beta * kl
    return losses, was_clipped, kl


class GroupRelative:
    """grpo (Shao et al. 2024): per prompt, sample `num_generations` answers, score them with the reward functions,
    and push up the answers above their group's mean reward, clipped as PPO, optionally held near the reference.

    One optimisation step per batch of samples (TRL's num_iterations=1), so π_old is the policy that sampled
    and the ratio is 1 in value; it carries the gradient, and clipping would act with more iterations.
    """

    reward_key = "reward"

    def __init__(self, tokenizer: Any, args: Any, rewards: list[Any], reference: Any = None) -> None:
        self.tokenizer, self.args, self.rewards, self.reference = tokenizer, args, rewards, reference

    def _sample(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(prompt ids, prompt mask, answer ids) with every prompt repeated num_generations times, adjacent."""
        import torch

        from peftkit.infer.engine import engine_for
        from peftkit.infer.jobs import Sampling
        from peftkit.infer.merging import adapters_merged

        g = self.args.num_generations
        ids = inputs["input_ids"].repeat_interleave(g, 0)
        mask = inputs["attention_mask"].repeat_interleave(g, 0)
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        sampling = Sampling(max_new_tokens=self.args.max_new_tokens, temperature=self.args.temperature,
                            top_p=self.args.top_p, top_k=self.args.top_k)
        unwrapped = getattr(model, "module", model)  # not the DDP wrapper
        with adapters_merged(unwrapped):  # 1.5x faster sampling; unmerged after, to 1e-7 (infer/merging.py)
            engine = engine_for(unwrapped, self.tokenizer, prompts, sampling.max_new_tokens, slots=len(prompts))
            jobs = engine.generate(prompts, sampling)
        # each answer with the end-of-turn token that ended it (learning to stop), then padding
        rows = [j.tokens + ([j.stop_token] if j.stop_token is not None else []) for j in jobs]
        width = max(1, max(map(len, rows)))
        pad = self.tokenizer.pad_token_id
        answers = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=ids.device)
        return ids, mask, answers

    def __call__(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, float], Any]:
        import torch

        from peftkit.data.template import stop_token_ids
        from peftkit.train import rewards as reward_functions

        g = self.args.num_generations
        ids, mask, answers = self._sample(model, inputs)
        is_stop = torch.isin(answers, torch.tensor(stop_token_ids(self.tokenizer), device=answers.device))
        stopped = is_stop.any(-1)
        first_stop = torch.where(stopped, is_stop.int().argmax(-1), answers.shape[1])
        positions = torch.arange(answers.shape[1], device=answers.device)
        answer_mask = (positions <= first_stop.unsqueeze(-1)).long()  # up to and with the stop token: learn to stop
        texts = [self.tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(answers, first_stop.tolist())]
        repeat = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731
        values = reward_functions.score(self.rewards, repeat(inputs["prompt"]), texts, repeat(inputs["reference"]))
        weights = torch.tensor([r.weight for r in self.rewards])
        total = (values * weights).sum(-1)
        advantages = group_advantages(total, g, self.args.scale_rewards).to(answers.device)

        forward = {"input_ids": torch.cat([ids, answers], 1), "attention_mask": torch.cat([mask, answer_mask], 1),
                   "logits_to_keep": answers.shape[1] + 1}
        logps = token_logps(model(**forward, use_cache=False).logits[:, :-1], answers)
        ref = (token_logps(reference_logits(model, self.reference, **forward)[:, :-1], answers)
               if self.args.beta else None)
        losses, clipped, kl = grpo_token_losses(logps, logps.detach(), advantages, self.args.epsilon, self.args.beta, ref)
        m = answer_mask.float()
        if self.args.loss_type == "grpo":
            loss = ((losses * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
        else:
            loss = (losses * m).sum() / m.sum().clamp(min=1)
        tokens = m.sum().clamp(min=1)
        metrics = {"reward": float(total.mean()), "reward_std": float(total.view(-1, g).std(-1).mean()),
                   "completion_length": float(m.sum(-1).mean()), "completions/truncated": float((~stopped).float().mean()),
                   "clip_ratio": float((clipped.float() * m).sum() / tokens)}
        metrics.update({f"rewards/{r.name}": float(values[:, i].mean()) for i, r in enumerate(self.rewards)})
        if self.args.beta:
            metrics["kl"] = float((kl.detach() * m).sum() / tokens)
        return loss, metrics, total.unsqueeze(-1)

    def summary(self, scores: Any) -> dict[str, float]:
        """Trainer evaluation: the mean reward of sampled answers to the eval prompts."""
        return {"reward": float(scores.float().mean())}


def _frozen_copy(model: Any) -> Any:
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


# The stage table's objectives (peftkit/stages.py): (model, RunConfig, reference, tokenizer) -> the loss;
# `reference` builds the frozen reference model when one is needed (freeze / full tuning: no adapter to disable).
def pairwise_reward(model: Any, cfg: Any, reference: Callable[[], Any], tokenizer: Any) -> PairwiseReward:
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


def group_relative(model: Any, cfg: Any, reference: Callable[[], Any], tokenizer: Any) -> GroupRelative:
    """The reference only with a KL penalty (grpo.beta > 0)."""
    from peftkit.errors import ConfigError
    from peftkit.train.rewards import build_rewards

    rewards, issues = build_rewards(cfg.grpo.rewards)
    if issues:
        raise ConfigError(issues)
    return GroupRelative(tokenizer, cfg.grpo, rewards, _reference(model, reference, cfg.grpo.beta > 0))


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


def eval_metrics(objective: Any) -> Any:
    """compute_metrics for Trainer evaluation: the objective's summary over the scores of the whole eval set."""
    def compute(eval_pred: Any) -> dict[str, float]:
        import torch

        return {k: round(v, 6) for k, v in objective.summary(torch.as_tensor(eval_pred.predictions)).items()}

    return compute
