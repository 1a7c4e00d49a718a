"""One model behind a lock: requests are queued and answered one at a time, streamed or whole.

Generation runs in a worker thread feeding a TextIteratorStreamer; stop strings are found in the
decoded text (a stop may span tokens) and never emitted, as in OpenAI's API.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from peftkit.config.schema import GenerateArgs
from peftkit.data.encode import render_prompt
from peftkit.data.formats import Message
from peftkit.data.template import stop_token_ids
from peftkit.eval.generate import generate


@dataclass
class Request:
    messages: list[Message]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]


@dataclass
class Outcome:
    """Filled in while streaming: why generation ended and how many tokens it took."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class StopScanner:
    """Emit decoded text as it arrives, holding back just enough to never emit part of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        cuts = [self.pending.find(s) for s in self.stops if s in self.pending]
        if cuts:
            self.stopped = True
            out, self.pending = self.pending[: min(cuts)], ""
            return out
        if len(self.pending) <= self.hold:
            return ""
        cut = len(self.pending) - self.hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class Engine:
    """Serialises access to the model; each request is generated in full before the next starts."""

    def __init__(self, model: Any, tokenizer: Any, context_window: int) -> None:
        self.model, self.tokenizer, self.context_window = model, tokenizer, context_window
        self.lock = threading.Lock()

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        return render_prompt(self.tokenizer, messages)

    def stream(self, request: Request, ids: list[int], outcome: Outcome,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Text pieces of the answer to the prompt `ids` (from `prompt_ids`); `outcome` holds the finish
        reason and token counts at the end.

        Generation stops at the next token once `cancel` is set (the client went away) or this generator
        is closed early: an abandoned request never keeps computing after it lets go of the lock.
        """
        from transformers import (
            StoppingCriteria,
            StoppingCriteriaList,
            TextIteratorStreamer,
        )

        outcome.prompt_tokens = len(ids)
        gen = GenerateArgs(max_new_tokens=request.max_tokens, do_sample=request.temperature > 0,
                           temperature=request.temperature or 1.0, top_p=request.top_p)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        halt = threading.Event()

        class _Halt(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return halt.is_set() or (cancel is not None and cancel.is_set())

        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["out"] = generate(self.model, self.tokenizer, [ids], gen, streamer=streamer,
                                         stopping_criteria=StoppingCriteriaList([_Halt()]))
            except Exception as e:  # surfaced to the request below, never kills the server
                result["error"] = e
                streamer.end()

        scanner = StopScanner(request.stop)
        with self.lock:
            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            try:
                for piece in streamer:
                    text = scanner.feed(piece)
                    if text:
                        yield text
                    if scanner.stopped:
                        halt.set()
            finally:  # also on GeneratorExit: the consumer left, so the worker must stop before the lock is free
                halt.set()
                worker.join()
        if "error" in result:
            raise result["error"]
        tail = scanner.flush()
        if tail:
            yield tail
        new = result["out"][0].tolist()
        stops = set(stop_token_ids(self.tokenizer))
        ended = any(t in stops for t in new)
        outcome.completion_tokens = len([t for t in new if t not in stops and t != self.tokenizer.pad_token_id])
        outcome.finish_reason = "stop" if scanner.stopped or ended else "length"
