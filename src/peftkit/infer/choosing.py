"""Each row's next token, chosen from its logits as its request's `Sampling` says: greedy; sampled (repetition
penalty, temperature, top-k, top-p, in transformers' order) with the request's own generator; in JSON mode
(infer/json_mode.py) a token that keeps the answer a closable JSON object; and the log-probabilities asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftkit.infer.jobs import Job

JSON_CANDIDATES = 64  # JSON mode looks for a valid token among this many most likely ones


class Vocab:
    """What JSON mode reads of the tokenizer, cached: each token's text alone, the tokens of a closing text, and
    the end-of-turn tokens (never a JSON candidate)."""

    def __init__(self, tokenizer: Any, stops: set[int]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self._texts: list[str] | None = None
        self._encoded: dict[str, list[int]] = {}

    def texts(self) -> list[str]:
        """Each token's text alone (JSON mode checks candidates by it)."""
        if self._texts is None:
            self._texts = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
        return self._texts

    def encode(self, text: str) -> list[int]:
        if text not in self._encoded:
            self._encoded[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._encoded[text]


class Generators:
    """Each request's own random generator: its samples depend on its seed only, not on its neighbours."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self._of: dict[Job, Any] = {}

    def __call__(self, job: Job) -> Any:
        import torch

        if job not in self._of:
            g = torch.Generator(device=self.device)
            g.manual_seed(job.sampling.seed if job.sampling.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self._of[job] = g
        return self._of[job]

    def drop(self, job: Job) -> None:
        """Forget a job that ended."""
        self._of.pop(job, None)


def choose(jobs: list[Job], logits: Any, vocab: Vocab, generators: Generators) -> list[int]:
    """The next token of each job, `logits` their rows ([len(jobs), vocabulary])."""
    chosen = logits.argmax(-1)
    for k, job in enumerate(jobs):
        s = job.sampling
        if s.json:
            chosen[k] = json_choice(job, logits[k], vocab, generators)
        elif s.repetition_penalty != 1.0 or s.temperature > 0:
            chosen[k] = sample(job, logits[k], generators)
    return chosen.tolist()


def sample(job: Job, logits: Any, generators: Generators) -> int:
    """Repetition penalty (as transformers': divide positive logits, multiply negative ones, over the
    prompt and answer), then temperature, top-k and nucleus sampling (transformers' order) with the
    request's own generator."""
    import torch

    s = job.sampling
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(job.prompt + job.tokens, device=logits.device)
        values = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(values < 0, values * s.repetition_penalty, values / s.repetition_penalty)
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(s.top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, -1)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < s.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generators(job)))


def json_choice(job: Job, logits: Any, vocab: Vocab, generators: Generators) -> int:
    """The most likely (or, sampling, a likely) token among the best JSON_CANDIDATES that keeps the answer a
    JSON-object prefix closable within the tokens left; else the first token of the closing text."""
    import torch

    from peftkit.infer.json_mode import closing, feed

    s, state, texts = job.sampling, job.json_state, vocab.texts()
    n = min(JSON_CANDIDATES, logits.shape[-1])
    if s.temperature > 0:
        probs = torch.softmax(logits / s.temperature, -1)
        order = torch.multinomial(probs, n, replacement=False, generator=generators(job)).tolist()
    else:
        order = logits.topk(n).indices.tolist()
    left = s.max_new_tokens - len(job.tokens) - 1
    for c in order:
        new = feed(state, texts[c]) if texts[c] and c not in vocab.stops else None
        if new is not None and len(vocab.encode(closing(new))) <= left:
            return int(c)
    return vocab.encode(closing(state))[0]


def json_closed(job: Job, token: int, vocab: Vocab) -> bool:
    """Feeds the token just appended to a JSON-mode job's grammar state: True once the object is closed
    (nothing may follow it)."""
    if job.json_state is None:
        return False
    from peftkit.infer.json_mode import feed

    job.json_state = feed(job.json_state, vocab.texts()[token])
    return job.json_state is not None and job.json_state.complete


def logprob(logits: Any, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the `k` most likely (token, log-probability), from one row's logits."""
    import torch

    lp = torch.log_softmax(logits, -1)
    top = lp.topk(max(k, 1))
    return lp[token].item(), list(zip(top.indices.tolist(), top.values.tolist()))[:k]
