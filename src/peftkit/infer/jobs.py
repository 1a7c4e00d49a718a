"""A request to the engine and how it comes back: `Sampling` (how one request is decoded), `Job` (its tokens as
they are generated, its end), `QueueFull` (the engine's waiting queue at its limit)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from peftkit.config.schema import GenerateArgs


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded. temperature 0 is greedy (top_p and seed then do nothing)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    json: bool = False  # JSON mode: the answer is a JSON object (infer/json_mode.py); needs max_new_tokens >= 2
    adapter: str | None = None  # in a multi-adapter engine, which adapter answers (None: the base model)

    @classmethod
    def of(cls, args: GenerateArgs, **overrides: Any) -> Sampling:
        """From the config's `generate` section."""
        sampled = args.do_sample and args.temperature > 0
        return cls(max_new_tokens=args.max_new_tokens, temperature=args.temperature if sampled else 0.0,
                   top_p=args.top_p if sampled else 1.0, top_k=args.top_k if sampled else 0,
                   repetition_penalty=args.repetition_penalty, json=args.json_mode, **overrides)


class QueueFull(Exception):
    """The engine's waiting queue is at its limit (serve answers 429)."""


@dataclass(eq=False)
class Job:
    """One request: its tokens arrive as they are generated; `finish_reason` is set when it ends
    (stop: an end-of-turn token; length: the token budget; cancelled: `cancel()` was called)."""

    prompt: list[int]
    sampling: Sampling
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_token: int | None = None  # the end-of-turn token that ended it (not in `tokens`)
    error: BaseException | None = None
    json_state: Any = None  # JSON mode: where in the grammar the answer is
    pixels: dict[str, Any] | None = None  # an image prompt's pixel inputs (data/render.py image_prompt)
    submitted: float = field(default_factory=time.time)
    cancelled: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def cancel(self) -> None:
        """Stop generating at the next step (a client went away); also drops a job still waiting."""
        self.cancelled.set()

    def stream(self, timeout: float | None = None, deadline: float | None = None) -> Iterator[list[int]]:
        """The new tokens as they come (several per piece when the consumer is slower than the engine).
        Waiting longer than `timeout` for the next token raises TimeoutError; past `deadline` (a time.time())
        the stream just ends, the job cancelled."""
        seen = 0
        while True:
            with self._changed:
                def ready(n: int = seen) -> bool:
                    return len(self.tokens) > n or self.finish_reason is not None

                remaining = None if deadline is None else deadline - time.time()
                if remaining is not None and remaining <= 0 and self.finish_reason is None:
                    self.cancel()
                    return
                wait = timeout if remaining is None else remaining if timeout is None else min(timeout, remaining)
                if not self._changed.wait_for(ready, wait):
                    if deadline is not None and time.time() >= deadline:
                        self.cancel()
                        return
                    raise TimeoutError(f"no token in {timeout} s")
                new, done = self.tokens[seen:], self.finish_reason is not None
            seen += len(new)
            if new:
                yield new
            if done:
                if self.error is not None:
                    raise self.error
                return

    def result(self, timeout: float | None = None) -> list[int]:
        for _ in self.stream(timeout):
            pass
        return self.tokens

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._changed:
            self.finish_reason, self.error = reason, error
            self._changed.notify_all()

    def _append(self, token: int, logprob: tuple[float, list[tuple[int, float]]] | None) -> None:
        with self._changed:
            self.tokens.append(token)
            if logprob is not None:
                self.logprobs.append(logprob)
            self._changed.notify_all()
