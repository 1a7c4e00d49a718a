"""The one generation engine (eval, chat, serve and GRPO's sampling): continuous batching over a slot cache.

Requests join the running batch as soon as a slot is free and leave it the step they finish, so one long
answer never holds a whole batch (what a static `model.generate` batch does). Each request has its own
sampling settings, seed, stop tokens, token budget and adapter.

`Engine` is the scheduler: it takes waiting jobs (infer/jobs.py) into free rows, prefills them, decodes a
step for every row and ends rows. The rest is its parts: the KV cache's rows and columns (infer/slots.py:
one preallocated tensor per layer, rows sharing one write column, shifted and compacted), each row's next
token (infer/choosing.py: greedy, sampled, JSON mode, logprobs), and the cache's size against the machine's
memory (infer/kv.py).

Measured on the 2-core CPU (SmolLM2-135M fp32, 64 rows, 30 decode steps): 275 ms a step with a
transformers StaticCache over 640 columns against 312 ms for `generate`'s DynamicCache, which copies the
whole cache every step; reading only the used columns is what the slot layer adds (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from peftkit.config.schema import GenerateArgs
from peftkit.data.template import stop_token_ids
from peftkit.errors import PeftkitError
from peftkit.infer.choosing import Generators, Vocab, choose, json_closed, logprob
from peftkit.infer.jobs import Job, QueueFull, Sampling
from peftkit.infer.kv import check_fits, kv_budget, kv_bytes_per_token
from peftkit.infer.slots import SlotCache
from peftkit.libraries import warn_untested
from peftkit.model.dtypes import autocast
from peftkit.model.families import image_prompt_refusal, sliding_window, stateful_layers

logger = logging.getLogger("peftkit")

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
PREFIX_MIN_TOKENS = 8  # a shared prefix shorter than this is not worth a cached copy


def _contiguous_output_layer_input(model: Any) -> None:
    """The output layer's input made contiguous (once per model). transformers slices the last position
    (`hidden[:, -1:, :]`, logits_to_keep=1): a strided view, which torch's CPU matmul cannot fold into one
    matrix product, so it broadcasts the weight into a batched one, copying it per row: a prefill of 16 prompts
    spent 1.7 s copying SmolLM2's 49152 x 576 output layer in bf16 (the decode steps' inputs are contiguous)."""
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layer is None or getattr(layer, "_peftkit_contiguous", False):
        return
    layer.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]) if args else None)
    layer._peftkit_contiguous = True


class Engine:
    """Continuous batching over `slots` rows of up to `max_len` tokens (prompt + answer) each.

    `generate` runs a list of prompts to completion in the calling thread (eval, GRPO); `start` runs the
    scheduler in a background thread and `submit` feeds it (serve, chat). `adapters` (names of a peft
    model's loaded LoRA adapters) makes a multi-adapter engine: each request's `Sampling.adapter` picks its
    adapter, rows with different adapters share a batch (peft's `adapter_names`).
    """

    def __init__(self, model: Any, tokenizer: Any, slots: int = 32, max_len: int = 2048, dtype: str | None = None,
                 max_queue: int | None = None, prefill_tokens: int = 4096, adapters: list[str] | None = None) -> None:
        self.model, self.tokenizer, self.slots, self.max_len, self.dtype = model, tokenizer, slots, max_len, dtype
        self.max_queue, self.prefill_tokens, self.adapters = max_queue, prefill_tokens, adapters
        self.stops = set(stop_token_ids(tokenizer))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns until 5.40);
        # the slot cache subclasses its CacheLayerMixin (libraries.py: TOUCH_POINTS)
        warn_untested("peftkit's generation engine", ("transformers",), "; its cache layer may not fit")
        self._cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.device = next(model.parameters()).device
        self.slot_cache = SlotCache(slots, max_len, model.config.get_text_config().num_hidden_layers, self.device)
        self.active: list[Job] = []  # the job in each row in use, rows 0..n-1
        self.waiting: deque[Job] = deque()
        self.lock = threading.Condition()
        self.generated_tokens = 0  # counters for /metrics
        self._thread: threading.Thread | None = None
        self._closing = False
        self.vocab, self.generators = Vocab(tokenizer, self.stops), Generators(self.device)
        self.prefix: list[int] = []
        self._prefix_kv: list[tuple[Any, Any]] | None = None
        # A row with a cached prefix holds masked padding between the prefix and the rest of its prompt, and a
        # sliding window counts cache columns, so the padding would use up the window (Gemma 2 / 3, Mistral gave
        # non-greedy tokens): a windowed model prefills each prompt whole, its tokens in contiguous columns.
        window = sliding_window(model.config)
        self._prefix_allowed = adapters is None and (window is None or window >= max_len)
        # Linear-attention, convolution and state-space layers (Qwen3.5, Qwen3-Next, LFM2, Mamba hybrids) keep a
        # running state that the slot cache cannot hold, pad or shift: such a model generates one request at a
        # time on transformers' own cache for its layer types (exact, without batching).
        self._stateful = stateful_layers(model.config) is not None
        self._own_cache: Any = None
        _contiguous_output_layer_input(model)
        if self._stateful:
            self.slots, self._prefix_allowed = 1, False
        self._images_refused = image_prompt_refusal(model.config)
        check_fits(model, self.slots, max_len, dtype)

    # ---- submitting ---------------------------------------------------------------------------------------

    def submit(self, prompt: list[int], sampling: Sampling, pixels: dict[str, Any] | None = None) -> Job:
        """Queue a request; raises QueueFull when `max_queue` requests already wait, ValueError when it
        cannot fit (prompt + max_new_tokens > max_len) or names an adapter this engine does not have.
        `pixels`: an image prompt's pixel inputs; such a prompt is prefilled alone, without a shared prefix."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if pixels and self._images_refused:
            raise ValueError(self._images_refused)
        if len(prompt) + sampling.max_new_tokens > self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens and asks for {sampling.max_new_tokens} more; "
                             f"this engine holds {self.max_len} in all")
        if sampling.adapter is not None and sampling.adapter not in (self.adapters or []):
            raise ValueError(f"no adapter {sampling.adapter!r} here (loaded: {self.adapters or 'none'})")
        job = Job(list(prompt), sampling, pixels=pixels or None)
        if sampling.json:
            from peftkit.infer.json_mode import JsonState

            job.json_state = JsonState()
        with self.lock:
            if self.max_queue is not None and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(job)
            self.lock.notify_all()
        return job

    def generate(self, prompts: list[list[int]], sampling: Sampling | list[Sampling],
                 on_done: Callable[[int, Job], None] | None = None,
                 pixels: list[dict[str, Any] | None] | None = None) -> list[Job]:
        """Run `prompts` to completion (same order); in this thread, or on the scheduler thread if started.
        `on_done(index, job)` is called as each finishes, in finishing order.

        Longest prompts are admitted first: rows admitted together share one padded prefill. A prefix all
        prompts share (the chat template's opening, an instruction) is computed once (`set_prefix`)."""
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        common = os.path.commonprefix(prompts) if len(prompts) > 1 else []
        if len(common) >= PREFIX_MIN_TOKENS:
            self.set_prefix(list(common[: min(map(len, prompts)) - 1]))
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        jobs = {i: self.submit(prompts[i], samplings[i], pixels[i] if pixels else None) for i in order}
        unfinished = order
        while unfinished:
            if self._thread is None:
                self.step()
            else:
                jobs[unfinished[0]].result()
            still = []
            for i in unfinished:
                if jobs[i].finish_reason is None:
                    still.append(i)
                elif on_done is not None:
                    on_done(i, jobs[i])
            unfinished = still
        for job in jobs.values():
            if job.error is not None:
                raise job.error
        return [jobs[i] for i in range(len(prompts))]

    def follow(self, job: Job) -> Iterator[list[int]]:
        """`job`'s new tokens as they come: stepping the engine in this thread unless it runs its own."""
        if self._thread is not None:
            yield from job.stream()
            return
        seen = 0
        while job.finish_reason is None:
            self.step()
            if len(job.tokens) > seen:
                yield job.tokens[seen:]
                seen = len(job.tokens)
        if job.error is not None:
            raise job.error

    # ---- the scheduler ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduler in a background thread until `close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peftkit-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self.lock:
            self._closing = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self._closing or bool(self.waiting) or bool(self.active))
                if self._closing:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - every request in flight hears of it; the server lives on
                with self.lock:
                    failed = self.active + list(self.waiting)
                    self.active = []
                    self.waiting.clear()
                    self.slot_cache.clear()
                for job in failed:
                    job._finish("error", e)

    def step(self) -> None:
        """Admit waiting requests into free rows (one padded prefill), then one decode step for all rows."""
        import torch

        with torch.inference_mode(), autocast(self.device.type, self.dtype):
            self._drop_cancelled()
            admitted = self._admit()
            if self.active and not admitted:
                self._decode()

    def _take(self) -> list[Job]:
        """Waiting jobs for the free rows, within the prefill token budget (at least one)."""
        taken: list[Job] = []
        with self.lock:
            while self.waiting and len(self.active) + len(taken) < self.slots:
                job = self.waiting[0]
                if job.cancelled.is_set():
                    self.waiting.popleft()._finish("cancelled")
                    continue
                if taken and (job.pixels or taken[0].pixels):
                    break  # an image prompt is prefilled alone: its pixel inputs belong to its row
                width = max(len(j.prompt) for j in [*taken, job])
                if taken and width * (len(taken) + 1) > self.prefill_tokens:
                    break
                taken.append(self.waiting.popleft())
        return taken

    def _admit(self) -> bool:
        """Prefill waiting jobs into rows n.. (SlotCache.prefill). With a cached prefix every job starts with,
        its keys and values are copied in and only the rest of each prompt is computed."""
        jobs = self._take()
        if not jobs:
            return False
        if self._stateful:
            return self._admit_alone(jobs[0])
        p = self._prefix_len(jobs) if not jobs[0].pixels else 0
        w = max(len(j.prompt) for j in jobs) - p  # the part computed now
        if p and any(p + w + j.sampling.max_new_tokens > self.max_len for j in jobs):
            p, w = 0, w + p  # the pads between prefix and answer would not fit: a plain prefill
        a, b, cache = len(self.active), len(self.active) + len(jobs), self.slot_cache
        ids, positions = cache.prefill(a, [j.prompt for j in jobs], p, w, self.tokenizer.pad_token_id or 0,
                                       self._prefix_cache() if p else None)
        self.active += jobs
        logits = self._forward((a, b), cache.t - w, ids, positions, cache.mask[a:b, : cache.t], jobs[0].pixels)
        self._emit(range(a, b), logits)
        return True

    def _admit_alone(self, job: Job) -> bool:
        """A stateful model's one row: its prompt prefilled into a fresh transformers cache for its layer types."""
        import torch
        from transformers import DynamicCache

        self._own_cache = DynamicCache(config=self.model.config)
        self.active.append(job)
        self._emit(range(1), self._forward_alone(torch.tensor([job.prompt], device=self.device), job.pixels))
        return True

    def _forward_alone(self, ids: Any, pixels: dict[str, Any] | None = None) -> Any:
        extra: dict[str, Any] = {k: v.to(self.device) for k, v in (pixels or {}).items()}
        if self.adapters is not None:
            extra["adapter_names"] = [self.active[0].sampling.adapter or BASE_ADAPTER]
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: self._own_cache}, **extra)
        return out.logits[:, -1].float()

    def set_prefix(self, ids: list[int]) -> None:
        """Tokens many prompts start with (a system prompt, an instruction): their keys and values are computed
        once, then copied into each new row whose prompt starts with them. Single-model engines only (an
        adapter changes the keys) whose attention is not windowed."""
        if self._prefix_allowed:
            self.prefix, self._prefix_kv = list(ids), None

    def _prefix_len(self, jobs: list[Job]) -> int:
        p = len(self.prefix)
        return p if p and all(len(j.prompt) > p and j.prompt[:p] == self.prefix for j in jobs) else 0

    def _prefix_cache(self) -> list[tuple[Any, Any]]:
        """The prefix's keys and values per layer, [1, kv_heads, P, head_dim], computed at the first use."""
        import torch
        from transformers import DynamicCache

        if self._prefix_kv is None:
            cache = DynamicCache()
            self.model(input_ids=torch.tensor([self.prefix], device=self.device), use_cache=True, logits_to_keep=1,
                       **{self._cache_kw: cache})
            self._prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr]
        return self._prefix_kv

    def _decode(self) -> None:
        cache = self.slot_cache
        if self._stateful:
            self._emit(range(1), self._forward_alone(cache.last[:1, None]))
            return
        n = len(self.active)
        t = cache.next_column(n)
        logits = self._forward((0, n), t, cache.last[:n, None], cache.positions[:n, None], cache.mask[:n, : t + 1])
        cache.positions[:n] += 1
        self._emit(range(n), logits)

    def _forward(self, rows: tuple[int, int], pointer: int, ids: Any, positions: Any, mask: Any,
                 pixels: dict[str, Any] | None = None) -> Any:
        self.slot_cache.point(rows, pointer)
        extra: dict[str, Any] = {k: v.to(self.device) for k, v in (pixels or {}).items()}
        if self.adapters is not None:
            extra["adapter_names"] = [j.sampling.adapter or BASE_ADAPTER for j in self.active[rows[0] : rows[1]]]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: self.slot_cache.cache}, **extra)
        return out.logits[:, -1].float()

    # ---- each step's tokens, finishing rows ---------------------------------------------------------------

    def _emit(self, rows: range, logits: Any) -> None:
        """Each row's next token (infer/choosing.py) appended to its job; rows that end are released."""
        jobs = [self.active[r] for r in rows]
        chosen = choose(jobs, logits, self.vocab, self.generators)
        finished = []
        for k, (r, job) in enumerate(zip(rows, jobs)):
            token, asked = chosen[k], job.sampling.logprobs
            if token in self.stops:
                job.stop_token = token
                finished.append((r, "stop"))
                continue
            job._append(token, logprob(logits[k], token, asked) if asked is not None else None)
            self.generated_tokens += 1
            self.slot_cache.last[r] = token
            if json_closed(job, token, self.vocab):
                finished.append((r, "stop"))  # the object is closed: nothing may follow it
            elif len(job.tokens) >= job.sampling.max_new_tokens:
                finished.append((r, "length"))
            elif job.cancelled.is_set():
                finished.append((r, "cancelled"))
        for r, reason in sorted(finished, reverse=True):
            self._release(r, reason)

    def _release(self, row: int, reason: str) -> None:
        """End the job in `row`; the last active row moves into its place."""
        job, last = self.active[row], len(self.active) - 1
        self.slot_cache.release(row, last)
        self.active[row] = self.active[last]
        self.active.pop()
        if not self.active:
            self._own_cache = None
        self.generators.drop(job)
        job._finish(reason)

    def _drop_cancelled(self) -> None:
        for r in reversed(range(len(self.active))):
            if self.active[r].cancelled.is_set():
                self._release(r, "cancelled")


def engine_for(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, slots: int,
               dtype: str | None = None) -> Engine:
    """An engine sized for a batch job: `slots` rows (at most one per prompt, and what the KV budget holds),
    columns for the longest."""
    if not prompts:
        raise PeftkitError("nothing to generate: no prompts")
    max_len = max(map(len, prompts)) + max_new_tokens + 1
    budget, _ = kv_budget(next(model.parameters()).device)
    fits = budget // (kv_bytes_per_token(model, dtype) * max_len)  # rows are throughput here: fewer when memory is short
    rows = max(1, min(slots, len(prompts), fits))
    if rows < min(slots, len(prompts)):
        logger.info("generating %d rows at a time, not %d: that is what the KV cache budget holds for %d tokens a row",
                    rows, min(slots, len(prompts)), max_len)
    return Engine(model, tokenizer, slots=rows, max_len=max_len, dtype=dtype)


def generate_batch(model: Any, tokenizer: Any, prompts: list[list[int]], args: GenerateArgs,
                   dtype: str | None = None, slots: int = 64, on_done: Callable[[int, Job], None] | None = None,
                   pixels: list[dict[str, Any] | None] | None = None) -> list[list[int]]:
    """New token ids for each prompt (end-of-turn token stripped), same order: the `generate` section's
    settings, the model as it is (see infer/merging.py `adapters_merged`); `pixels`, each image prompt's inputs."""
    if not prompts:
        return []
    engine = engine_for(model, tokenizer, prompts, args.max_new_tokens, slots, dtype)
    return [job.tokens for job in engine.generate(prompts, Sampling.of(args), on_done, pixels)]
