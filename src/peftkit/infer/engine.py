"""The one generation engine (eval, chat, serve and GRPO's sampling): continuous batching over a slot cache.

Requests join the running batch as soon as a slot is free and leave it the step they finish, so one long
answer never holds a whole batch (what a static `model.generate` batch does). Each request has its own
sampling settings, seed, stop tokens, token budget and adapter.

The KV cache is one preallocated tensor per layer, [slots, kv_heads, max_len, head_dim] (`_SlotLayer`, a
transformers cache layer). Active requests are rows 0..n-1; all share one write column `t`: row r holds its
tokens in columns [start[r], t), and the attention mask is True exactly there. A new request is prefilled
into a free row at columns [t - len, t); a finished row is replaced by the last active row; when the dead
columns on the left grow, everything shifts left. Attention reads only columns [0, t + 1).

Measured on the 2-core CPU (SmolLM2-135M fp32, 64 rows, 30 decode steps): 275 ms a step with a
transformers StaticCache over 640 columns against 312 ms for `generate`'s DynamicCache, which copies the
whole cache every step; reading only the used columns is what the slot layer adds (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from peftkit.config.schema import GenerateArgs
from peftkit.data.template import stop_token_ids
from peftkit.errors import PeftkitError
from peftkit.model.dtypes import autocast
from peftkit.model.families import sliding_window, stateful_layers

logger = logging.getLogger("peftkit")

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
JSON_CANDIDATES = 64  # JSON mode looks for a valid token among this many most likely ones
PREFIX_MIN_TOKENS = 8  # a shared prefix shorter than this is not worth a cached copy


KV_CACHE_ENV = "PEFTKIT_KV_CACHE_GIB"  # the KV cache's budget in GiB (as vLLM's VLLM_CPU_KVCACHE_SPACE)
KV_CACHE_SHARE = 0.6  # of the memory available at start, when no budget is given


def kv_bytes_per_token(model: Any, dtype: str | None = None) -> int:
    """Bytes one cached token takes in every layer (keys and values), in the dtype the engine computes in."""
    text = model.config.get_text_config()
    heads = getattr(text, "num_attention_heads", 1) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    size = 2 if dtype in ("bfloat16", "float16") else next(model.parameters()).element_size()  # autocast_dtype's names
    return 2 * text.num_hidden_layers * kv_heads * head_dim * size


def kv_budget(device: Any = None) -> tuple[int, str]:
    """(bytes the KV cache may take, where that figure comes from): $PEFTKIT_KV_CACHE_GIB, else a share of the
    memory free now (the GPU's, or the machine's MemAvailable)."""
    given = os.environ.get(KV_CACHE_ENV)
    if given:
        try:
            return int(float(given) * 2**30), f"${KV_CACHE_ENV}={given}"
        except ValueError:
            raise PeftkitError(f"${KV_CACHE_ENV}={given!r}: a number of GiB, e.g. 4") from None
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch

        free = torch.cuda.mem_get_info(device)[0]
        return int(free * KV_CACHE_SHARE), f"{KV_CACHE_SHARE:.0%} of the GPU's free {free / 2**30:.1f} GiB"
    available = _mem_available()
    return int(available * KV_CACHE_SHARE), f"{KV_CACHE_SHARE:.0%} of the {available / 2**30:.1f} GiB available"


def _mem_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) if hasattr(os, "sysconf") else 8 * 2**30


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


def model_context(model: Any) -> int:
    """The model's context window in tokens (its config's max_position_embeddings)."""
    return int(getattr(model.config.get_text_config(), "max_position_embeddings", 2048) or 2048)


def fitting_context(model: Any, slots: int, dtype: str | None, wanted: int | None = None) -> int:
    """The tokens per row (prompt + answer) a serving engine of `slots` rows holds: `wanted` (else the model's
    context), refused when it does not fit the KV budget; without `wanted`, the model's context shortened to
    what fits (to a multiple of 256, at least 256)."""
    context = model_context(model)
    per_token = kv_bytes_per_token(model, dtype) * slots  # one column of every row
    budget, source = kv_budget(next(model.parameters()).device)
    fits = budget // per_token if per_token else context
    if wanted is not None:
        if wanted > fits:
            raise PeftkitError(_too_big(slots, wanted, per_token, budget, source))
        return wanted
    if fits >= context:
        return context
    if fits < 256:
        raise PeftkitError(_too_big(slots, 256, per_token, budget, source))
    return int(fits // 256 * 256)


def _too_big(slots: int, tokens: int, per_token: int, budget: int, source: str) -> str:
    return (f"the KV cache for {slots} rows of {tokens} tokens needs {per_token * tokens / 2**30:.1f} "
            f"GiB, more than its budget of {budget / 2**30:.1f} GiB ({source}): use fewer rows (--slots, "
            f"eval.batch_size), a shorter context (--max-model-len), or set ${KV_CACHE_ENV}")


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


class _SlotLayer:
    """A transformers cache layer over rows [rows) of a preallocated buffer, written at column `pointer`.

    Built on transformers' public cache-layer interface (CacheLayerMixin: update / get_mask_sizes /
    get_seq_length); the engine moves `rows` and `pointer` before every forward."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from transformers.cache_utils import CacheLayerMixin

        class SlotLayer(CacheLayerMixin):
            is_sliding = False

            def __init__(self, slots: int, max_len: int) -> None:
                super().__init__()
                self.slots, self.max_len = slots, max_len
                self.rows, self.pointer = (0, 0), 0

            def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
                import torch

                heads, device = key_states.shape[1], key_states.device
                self.keys = torch.zeros(self.slots, heads, self.max_len, key_states.shape[-1],
                                        dtype=key_states.dtype, device=device)
                self.values = torch.zeros(self.slots, heads, self.max_len, value_states.shape[-1],
                                          dtype=value_states.dtype, device=device)
                self.is_initialized = True

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                (a, b), p, q = self.rows, self.pointer, key_states.shape[-2]
                keys, values = self.keys, self.values
                assert keys is not None and values is not None
                keys[a:b, :, p : p + q] = key_states
                values[a:b, :, p : p + q] = value_states
                return keys[a:b, :, : p + q], values[a:b, :, : p + q]

            def get_mask_sizes(self, query_length: Any, *args: Any) -> tuple[int, int]:
                q = query_length if isinstance(query_length, int) else query_length.shape[0]
                return self.pointer + q, 0

            def get_seq_length(self, *args: Any) -> int:
                return self.pointer

            def get_max_length(self) -> int:
                return self.max_len

        return SlotLayer(*args, **kwargs)


class Engine:
    """Continuous batching over `slots` rows of up to `max_len` tokens (prompt + answer) each.

    `generate` runs a list of prompts to completion in the calling thread (eval, GRPO); `start` runs the
    scheduler in a background thread and `submit` feeds it (serve, chat). `adapters` (names of a peft
    model's loaded LoRA adapters) makes a multi-adapter engine: each request's `Sampling.adapter` picks its
    adapter, rows with different adapters share a batch (peft's `adapter_names`).
    """

    def __init__(self, model: Any, tokenizer: Any, slots: int = 32, max_len: int = 2048, dtype: str | None = None,
                 max_queue: int | None = None, prefill_tokens: int = 4096, adapters: list[str] | None = None) -> None:
        import torch
        from transformers.cache_utils import Cache

        self.model, self.tokenizer, self.slots, self.max_len, self.dtype = model, tokenizer, slots, max_len, dtype
        self.max_queue, self.prefill_tokens, self.adapters = max_queue, prefill_tokens, adapters
        self.stops = set(stop_token_ids(tokenizer))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns until 5.40)
        self._cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.device = next(model.parameters()).device
        self.layers = [_SlotLayer(slots, max_len) for _ in range(model.config.get_text_config().num_hidden_layers)]
        self.cache = Cache(layers=self.layers)
        self.mask = torch.zeros(slots, max_len, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)  # next position per row
        self.first = [0] * slots  # first column of each active row
        self.last = torch.zeros(slots, dtype=torch.long, device=self.device)  # the token each row feeds next
        self.active: list[Job] = []
        self.t = 0  # the shared write column
        self.waiting: deque[Job] = deque()
        self.lock = threading.Condition()
        self.generated_tokens = 0  # counters for /metrics
        self._thread: threading.Thread | None = None
        self._closing = False
        self._generators: dict[Job, Any] = {}
        self.prefix: list[int] = []
        self._token_texts: list[str] | None = None
        self._encoded: dict[str, list[int]] = {}
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
        need = kv_bytes_per_token(model, dtype) * self.slots * max_len  # allocated at the first forward: said now
        budget, source = kv_budget(self.device)
        if need > budget:
            raise PeftkitError(_too_big(self.slots, max_len, need // max_len, budget, source))

    # ---- submitting ---------------------------------------------------------------------------------------

    def submit(self, prompt: list[int], sampling: Sampling) -> Job:
        """Queue a request; raises QueueFull when `max_queue` requests already wait, ValueError when it
        cannot fit (prompt + max_new_tokens > max_len) or names an adapter this engine does not have."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + sampling.max_new_tokens > self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens and asks for {sampling.max_new_tokens} more; "
                             f"this engine holds {self.max_len} in all")
        if sampling.adapter is not None and sampling.adapter not in (self.adapters or []):
            raise ValueError(f"no adapter {sampling.adapter!r} here (loaded: {self.adapters or 'none'})")
        job = Job(list(prompt), sampling)
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
                 on_done: Callable[[int, Job], None] | None = None) -> list[Job]:
        """Run `prompts` to completion (same order); in this thread, or on the scheduler thread if started.
        `on_done(index, job)` is called as each finishes, in finishing order.

        Longest prompts are admitted first: rows admitted together share one padded prefill. A prefix all
        prompts share (the chat template's opening, an instruction) is computed once (`set_prefix`)."""
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        common = os.path.commonprefix(prompts) if len(prompts) > 1 else []
        if len(common) >= PREFIX_MIN_TOKENS:
            self.set_prefix(list(common[: min(map(len, prompts)) - 1]))
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        jobs = {i: self.submit(prompts[i], samplings[i]) for i in order}
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
                    self.active, self.t = [], 0
                    self.waiting.clear()
                    self.mask.zero_()
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
                width = max(len(j.prompt) for j in [*taken, job])
                if taken and width * (len(taken) + 1) > self.prefill_tokens:
                    break
                taken.append(self.waiting.popleft())
        return taken

    def _admit(self) -> bool:
        """Prefill waiting jobs into rows n.. at columns [t - width, t). With a cached prefix every job starts
        with, its keys and values are copied in at [t - w - P, t - w) and only the rest is computed (left
        padded to w; the pads between are masked)."""
        import torch

        jobs = self._take()
        if not jobs:
            return False
        if self._stateful:
            return self._admit_alone(jobs[0])
        p = self._prefix_len(jobs)
        w = max(len(j.prompt) for j in jobs) - p  # the part computed now
        if p and any(p + w + j.sampling.max_new_tokens > self.max_len for j in jobs):
            p, w = 0, w + p  # the pads between prefix and answer would not fit: a plain prefill
        width = p + w
        if self.t < width:  # room on the left for the new prompts: move the active rows right
            self._shift(width - self.t)
        elif self._crowded():
            self._compact()
            if self.t < width:
                self._shift(width - self.t)
        a, b, t = len(self.active), len(self.active) + len(jobs), self.t
        ids = torch.full((len(jobs), w), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        positions = torch.zeros(len(jobs), w, dtype=torch.long)
        self.mask[a:b] = 0
        for k, job in enumerate(jobs):
            n = len(job.prompt)
            ids[k, w - (n - p) :] = torch.tensor(job.prompt[p:])
            positions[k, w - (n - p) :] = torch.arange(p, n)
            self.mask[a + k, t - (n - p) : t] = 1
            self.first[a + k], self.positions[a + k] = (t - width if p else t - n), n
        if p:
            self.mask[a:b, t - width : t - w] = 1
            for layer, (keys, values) in zip(self.layers, self._prefix_cache()):
                if not layer.is_initialized:
                    layer.lazy_initialization(keys, values)
                layer.keys[a:b, :, t - width : t - w] = keys
                layer.values[a:b, :, t - width : t - w] = values
        self.active += jobs
        logits = self._forward((a, b), t - w, ids.to(self.device), positions.to(self.device), self.mask[a:b, :t])
        self._emit(range(a, b), logits)
        return True

    def _admit_alone(self, job: Job) -> bool:
        """A stateful model's one row: its prompt prefilled into a fresh transformers cache for its layer types."""
        import torch
        from transformers import DynamicCache

        self._own_cache = DynamicCache(config=self.model.config)
        self.active.append(job)
        self._emit(range(1), self._forward_alone(torch.tensor([job.prompt], device=self.device)))
        return True

    def _forward_alone(self, ids: Any) -> Any:
        extra: dict[str, Any] = {}
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
        if self._stateful:
            self._emit(range(1), self._forward_alone(self.last[:1, None]))
            return
        if self._crowded():
            self._compact()
        n, t = len(self.active), self.t
        self.mask[:n, t] = 1
        self.t += 1
        logits = self._forward((0, n), t, self.last[:n, None], self.positions[:n, None], self.mask[:n, : t + 1])
        self.positions[:n] += 1
        self._emit(range(n), logits)

    def _forward(self, rows: tuple[int, int], pointer: int, ids: Any, positions: Any, mask: Any) -> Any:
        for layer in self.layers:
            layer.rows, layer.pointer = rows, pointer
        extra: dict[str, Any] = {}
        if self.adapters is not None:
            extra["adapter_names"] = [j.sampling.adapter or BASE_ADAPTER for j in self.active[rows[0] : rows[1]]]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: self.cache}, **extra)
        return out.logits[:, -1].float()

    # ---- choosing tokens, finishing rows -----------------------------------------------------------------

    def _emit(self, rows: range, logits: Any) -> None:
        import torch

        jobs = [self.active[r] for r in rows]
        chosen = logits.argmax(-1)
        for k, job in enumerate(jobs):
            s = job.sampling
            if s.json:
                chosen[k] = self._json_choice(job, logits[k])
            elif s.repetition_penalty != 1.0 or s.temperature > 0:
                chosen[k] = self._sample(job, logits[k])
        chosen_list = chosen.tolist()
        finished = []
        for k, (r, job) in enumerate(zip(rows, jobs)):
            token = chosen_list[k]
            logprob = None
            if job.sampling.logprobs is not None:
                lp = torch.log_softmax(logits[k], -1)
                top = lp.topk(max(job.sampling.logprobs, 1))
                logprob = (lp[token].item(), list(zip(top.indices.tolist(), top.values.tolist()))[: job.sampling.logprobs])
            if token in self.stops:
                job.stop_token = token
                finished.append((r, "stop"))
                continue
            job._append(token, logprob)
            self.generated_tokens += 1
            self.last[r] = token
            if job.json_state is not None:
                from peftkit.infer.json_mode import feed

                job.json_state = feed(job.json_state, self._texts()[token])
            if job.json_state is not None and job.json_state.complete:
                finished.append((r, "stop"))  # the object is closed: nothing may follow it
            elif len(job.tokens) >= job.sampling.max_new_tokens:
                finished.append((r, "length"))
            elif job.cancelled.is_set():
                finished.append((r, "cancelled"))
        for r, reason in sorted(finished, reverse=True):
            self._release(r, reason)

    def _sample(self, job: Job, logits: Any) -> int:
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
        return int(torch.multinomial(probs, 1, generator=self._generator(job)))

    def _json_choice(self, job: Job, logits: Any) -> int:
        """The most likely (or, sampling, a likely) token among the best JSON_CANDIDATES that keeps the answer a
        JSON-object prefix closable within the tokens left; else the first token of the closing text."""
        import torch

        from peftkit.infer.json_mode import closing, feed

        s, state, texts = job.sampling, job.json_state, self._texts()
        n = min(JSON_CANDIDATES, logits.shape[-1])
        if s.temperature > 0:
            probs = torch.softmax(logits / s.temperature, -1)
            order = torch.multinomial(probs, n, replacement=False, generator=self._generator(job)).tolist()
        else:
            order = logits.topk(n).indices.tolist()
        left = s.max_new_tokens - len(job.tokens) - 1
        for c in order:
            new = feed(state, texts[c]) if texts[c] and c not in self.stops else None
            if new is not None and len(self._encode(closing(new))) <= left:
                return int(c)
        return self._encode(closing(state))[0]

    def _texts(self) -> list[str]:
        """Each token's text alone (JSON mode checks candidates by it)."""
        if self._token_texts is None:
            self._token_texts = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
        return self._token_texts

    def _encode(self, text: str) -> list[int]:
        if text not in self._encoded:
            self._encoded[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._encoded[text]

    def _generator(self, job: Job) -> Any:
        """The request's own random generator: its samples depend on its seed only, not on its neighbours."""
        import torch

        if job not in self._generators:
            g = torch.Generator(device=self.device)
            g.manual_seed(job.sampling.seed if job.sampling.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self._generators[job] = g
        return self._generators[job]

    def _release(self, row: int, reason: str) -> None:
        """End the job in `row`; the last active row moves into its place."""
        job = self.active[row]
        last = len(self.active) - 1
        if row != last:
            t = self.t
            for layer in self.layers:
                if layer.is_initialized:
                    layer.keys[row, :, :t] = layer.keys[last, :, :t]
                    layer.values[row, :, :t] = layer.values[last, :, :t]
            self.mask[row] = self.mask[last]
            self.positions[row], self.last[row], self.first[row] = self.positions[last], self.last[last], self.first[last]
            self.active[row] = self.active[last]
        self.mask[last] = 0
        self.active.pop()
        if not self.active:
            self.t, self._own_cache = 0, None
        self._generators.pop(job, None)
        job._finish(reason)

    def _drop_cancelled(self) -> None:
        for r in reversed(range(len(self.active))):
            if self.active[r].cancelled.is_set():
                self._release(r, "cancelled")

    def _shift(self, delta: int) -> None:
        """Move the active rows' columns [0, t) by `delta` (right > 0, left < 0)."""
        n, t = len(self.active), self.t
        lo = max(0, -delta)
        for layer in self.layers:
            if layer.is_initialized:
                for buf in (layer.keys, layer.values):
                    buf[:n, :, lo + delta : t + delta] = buf[:n, :, lo:t].clone()
        self.mask[:n, lo + delta : t + delta] = self.mask[:n, lo:t].clone()
        if delta > 0:
            self.mask[:n, :delta] = 0
        else:
            self.mask[:n, t + delta : t] = 0
        self.t = t + delta
        for r in range(n):
            self.first[r] += delta

    def _crowded(self) -> bool:
        """No column left for the next step, or more than half the columns read are dead (and at least 64)."""
        dead = min(self.first[: len(self.active)]) if self.active else 0
        return self.t + 1 > self.max_len or dead > max(64, self.t // 2)

    def _compact(self) -> None:
        """Drop the columns no active row uses any more on the left."""
        if self.active:
            self._shift(-min(self.first[: len(self.active)]))


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
                   dtype: str | None = None, slots: int = 64,
                   on_done: Callable[[int, Job], None] | None = None) -> list[list[int]]:
    """New token ids for each prompt (end-of-turn token stripped), same order: the `generate` section's
    settings, the model as it is (see `adapters_merged`)."""
    if not prompts:
        return []
    engine = engine_for(model, tokenizer, prompts, args.max_new_tokens, slots, dtype)
    return [job.tokens for job in engine.generate(prompts, Sampling.of(args), on_done)]


@contextlib.contextmanager
def adapters_merged(model: Any) -> Iterator[None]:
    """LoRA folded into the base weights while generating, unfolded after (1.55x faster greedy decoding of
    SmolLM2-135M r16 all-linear, batch 50 on a 2-core CPU: each projection is one matmul instead of three).
    Unmerging leaves the weights equal to 1e-7 relative (float rounding), far below any check here.
    Models without LoRA layers, already merged, with several adapters loaded or on a quantized base (merging
    would requantize it) are left alone."""
    from peft import PeftModel

    from peftkit.model.quantization import is_quantized

    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")] if isinstance(model, PeftModel) else []
    merge = bool(layers) and not any(m.merged for m in layers) and len(model.peft_config) == 1 \
        and not is_quantized(model)
    if merge:
        model.merge_adapter()
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if merge:
            model.unmerge_adapter()
