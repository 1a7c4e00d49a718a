"""grpo's objective: sampled answers scored by the reward functions, pushed up or down by their group's advantage.

The sampler is handed in (engine_sampler: the generation engine), so the loss never drives generation itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peftkit.objectives.pairs import reference_logits, token_logps

# (model, batch of prompts) -> (prompt ids, prompt mask, answer ids), every prompt repeated num_generations times
Sampler = Callable[[Any, dict[str, Any]], tuple[Any, Any, Any]]


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


def engine_sampler(tokenizer: Any, args: Any) -> Sampler:
    """GroupRelative's sampler: the generation engine on the policy itself, with grpo's sampling settings (`args`)."""
    def sample(model: Any, inputs: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(prompt ids, prompt mask, answer ids) with every prompt repeated num_generations times, adjacent."""
        import torch

        from peftkit.infer.engine import engine_for
        from peftkit.infer.jobs import Sampling
        from peftkit.infer.merging import adapters_merged

        g = args.num_generations
        ids = inputs["input_ids"].repeat_interleave(g, 0)
        mask = inputs["attention_mask"].repeat_interleave(g, 0)
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k)
        unwrapped = getattr(model, "module", model)  # not the DDP wrapper
        with adapters_merged(unwrapped):  # 1.5x faster sampling; unmerged after, to 1e-7 (infer/merging.py)
            engine = engine_for(unwrapped, tokenizer, prompts, sampling.max_new_tokens, slots=len(prompts))
            jobs = engine.generate(prompts, sampling)
        # each answer with the end-of-turn token that ended it (learning to stop), then padding
        rows = [j.tokens + ([j.stop_token] if j.stop_token is not None else []) for j in jobs]
        width = max(1, max(map(len, rows)))
        pad = tokenizer.pad_token_id
        answers = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=ids.device)
        return ids, mask, answers

    return sample


class GroupRelative:
    """grpo (Shao et al. 2024): per prompt, sample `num_generations` answers, score them with the reward functions,
    and push up the answers above their group's mean reward, clipped as PPO, optionally held near the reference.

    One optimisation step per batch of samples (TRL's num_iterations=1), so π_old is the policy that sampled
    and the ratio is 1 in value; it carries the gradient, and clipping would act with more iterations.
    `sample` draws the answers (engine_sampler in training), so the loss itself never drives generation.
    """

    reward_key = "reward"

    def __init__(self, tokenizer: Any, args: Any, rewards: list[Any], sample: Sampler, reference: Any = None) -> None:
        self.tokenizer, self.args, self.rewards, self.sample, self.reference = tokenizer, args, rewards, sample, reference

    def __call__(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, float], Any]:
        import torch

        from peftkit.data.template import stop_token_ids
        from peftkit.train import rewards as reward_functions

        g = self.args.num_generations
        ids, mask, answers = self.sample(model, inputs)
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
