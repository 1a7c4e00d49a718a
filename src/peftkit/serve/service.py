"""The server's side of the engine: requests become jobs of the one batching engine (infer/engine.py),
their tokens become text with stop strings applied.

Stop strings are found in the decoded text (a stop may span tokens) and never emitted, as in OpenAI's API.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from peftkit.data.formats import Message
from peftkit.data.render import model_prompt, render_prompt
from peftkit.infer.engine import PREFIX_MIN_TOKENS, Engine
from peftkit.infer.jobs import Job, Sampling


@dataclass
class Request:
    messages: list[Message]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # top_logprobs asked for (0: only the chosen token's); None: no logprobs
    adapter: str | None = None  # which adapter answers (None: the base model)
    json: bool = False  # response_format json_object: the answer is constrained to a JSON object
    prompt: str | None = None  # /v1/completions: raw text continued as it is (no chat template); messages unused
    tools: list[dict[str, Any]] | None = None  # offered to the model (tool_choice auto or a named function)
    call: str | None = None  # tool_choice names this function: the answer is its arguments (JSON mode)


@dataclass(frozen=True)
class ImageInput:
    """How a server reads images: an image-text model's processor (None: images are refused), and the folder
    local image paths must be under (None: data: URLs only)."""

    processor: Any = None
    root: Path | None = None


@dataclass
class Outcome:
    """Filled in while streaming: why generation ended, how many tokens it took, their log-probabilities."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


def template_opening(tokenizer: Any) -> list[int]:
    """The tokens every chat request without its own system message starts with (the template's default system
    prompt and the user turn's opening): what two different one-message conversations share; [] without a template."""
    try:
        a, b = (render_prompt(tokenizer, [Message(role="user", content=c)]) for c in ("a", "b"))
    except Exception:  # noqa: BLE001 - no chat template (completions only): no shared opening
        return []
    return list(os.path.commonprefix([a, b]))


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


class Service:
    """The engine running in its own thread, shared by every request; `stream` is one answer's text.

    `max_queue` requests may wait for a row; one more is refused (QueueFull: the app answers 429)."""

    def __init__(self, model: Any, tokenizer: Any, context_window: int, slots: int = 16, max_queue: int = 64,
                 adapters: list[str] | None = None, request_timeout: float = 600,
                 images: ImageInput | None = None) -> None:
        self.tokenizer, self.context_window, self.request_timeout = tokenizer, context_window, request_timeout
        images = images or ImageInput()
        self.processor, self.image_root = images.processor, images.root
        self.engine = Engine(model, tokenizer, slots=slots, max_len=context_window, max_queue=max_queue,
                             adapters=adapters)
        opening = template_opening(tokenizer)
        if len(opening) >= PREFIX_MIN_TOKENS:  # the keys / values of the template's opening, computed once
            self.engine.set_prefix(opening)  # (single-model engines only: an adapter changes them)
        self.engine.start()
        self.started = time.time()

    def prompt(self, request: Request) -> tuple[list[int], dict[str, Any] | None]:
        """The chat template's rendering of the messages (or a completion's raw prompt tokenized as it is), and an
        image request's pixel inputs (ValueError: an image that cannot be read or is not allowed here)."""
        if request.prompt is not None:
            return list(self.tokenizer(request.prompt)["input_ids"]), None
        messages, images = self._images(request.messages)
        return model_prompt(self.tokenizer, self.processor, messages, images, request.tools, request.call)

    def _images(self, messages: list[Message]) -> tuple[list[Message], list[str]]:
        """The messages with their image parts as template placeholders, and the images in order: data: URLs, or
        files under --image-root (anything else is refused)."""
        from peftkit.data.images import load_image, resolve

        out, found = [], []
        for m in messages:
            if isinstance(m["content"], list):
                parts = []
                for part in m["content"]:
                    if part["type"] == "image":
                        found.append(self._allowed(resolve(part["image"], None)))
                        load_image(found[-1])
                        part = {"type": "image"}
                    parts.append(part)
                m = {**m, "content": parts}
            out.append(m)
        return out, found

    def _allowed(self, ref: str) -> str:
        if ref.startswith("data:"):
            return ref
        root = self.image_root.resolve() if self.image_root is not None else None
        if root is None or not Path(ref).resolve().is_relative_to(root):
            raise ValueError("local image paths are read only under the server's --image-root"
                             + (f" ({root})" if root else " (none is set: send images as data: URLs)"))
        return ref

    def submit(self, request: Request, ids: list[int], pixels: dict[str, Any] | None = None) -> list[Job]:
        """The request's n jobs, queued (QueueFull when the queue is full; then none is queued)."""
        sampling = Sampling(max_new_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                            seed=request.seed, logprobs=request.logprobs, adapter=request.adapter,
                            json=request.json or request.call is not None)
        jobs: list[Job] = []
        try:
            for k in range(request.n):
                seed = None if request.seed is None else request.seed + k  # n different samples, reproducible
                jobs.append(self.engine.submit(ids, replace(sampling, seed=seed), pixels))
        except Exception:
            for job in jobs:
                job.cancel()
            raise
        return jobs

    def stream(self, request: Request, job: Job, outcome: Outcome,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Text pieces of `job`'s answer; `outcome` holds the finish reason, token counts and log-probabilities
        at the end. Setting `cancel` (the client went away) or closing this generator cancels the job; so
        does `request_timeout` seconds after submission (the answer so far, finish_reason length)."""
        outcome.prompt_tokens = len(job.prompt)
        scanner = StopScanner(request.stop)
        tokens: list[int] = []
        emitted = 0
        deadline = job.submitted + self.request_timeout
        try:
            for new in job.stream(deadline=deadline):
                if cancel is not None and cancel.is_set():
                    break
                if request.logprobs is not None:  # appended with each token by the engine: ready as it arrives
                    outcome.logprobs += [(t, *job.logprobs[i]) for i, t in enumerate(new, start=len(tokens))]
                tokens += new
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest
                    continue
                piece = scanner.feed(text[emitted:])
                emitted = len(text)
                if piece:
                    yield piece
                if scanner.stopped:
                    break
        finally:  # the consumer left, a stop string matched, or the client went away: the row is freed
            job.cancel()
        rest = self.tokenizer.decode(tokens, skip_special_tokens=True)[emitted:]  # a held-back partial character
        tail = scanner.feed(rest) + scanner.flush()
        if tail:
            yield tail
        outcome.completion_tokens = len(tokens)
        outcome.finish_reason = "stop" if scanner.stopped or job.finish_reason == "stop" else "length"

    def metrics(self) -> dict[str, float]:
        """What /metrics reports."""
        engine = self.engine
        elapsed = max(time.time() - self.started, 1e-9)
        return {"queue_depth": len(engine.waiting), "running": len(engine.active), "slots": engine.slots,
                "generated_tokens_total": engine.generated_tokens,
                "generated_tokens_per_second": round(engine.generated_tokens / elapsed, 2)}

    def close(self) -> None:
        self.engine.close()
