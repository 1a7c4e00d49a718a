"""The KV cache sized to the machine: what one cached token takes, the budget the cache may use
($PEFTKIT_KV_CACHE_GIB, else a share of the memory free now), and the context a serving engine's rows fit in.

Checked before anything is allocated: a server that reserved more than the machine has stopped answering,
even /health; rows that do not fit are refused with the figures instead.
"""

from __future__ import annotations

import os
from typing import Any

from peftkit.errors import PeftkitError

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


def check_fits(model: Any, slots: int, max_len: int, dtype: str | None) -> None:
    """Refuses an engine of `slots` rows of `max_len` tokens that the KV budget does not hold (the cache is
    allocated at the first forward: said before that)."""
    need = kv_bytes_per_token(model, dtype) * slots * max_len
    budget, source = kv_budget(next(model.parameters()).device)
    if need > budget:
        raise PeftkitError(_too_big(slots, max_len, need // max_len, budget, source))


def _too_big(slots: int, tokens: int, per_token: int, budget: int, source: str) -> str:
    return (f"the KV cache for {slots} rows of {tokens} tokens needs {per_token * tokens / 2**30:.1f} "
            f"GiB, more than its budget of {budget / 2**30:.1f} GiB ({source}): use fewer rows (--slots, "
            f"eval.batch_size), a shorter context (--max-model-len), or set ${KV_CACHE_ENV}")
