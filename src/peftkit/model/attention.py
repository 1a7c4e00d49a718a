"""The attention path for packed training: padding-free rows on a GPU, with the varlen kernel that is installed.

Packed rows (data/packing.py) are isolated by their position_ids restarting at 0. On a CPU they
stay rows padded to the longest (sdpa with transformers' block-diagonal mask). On CUDA a batch is
flattened into one row with no padding (data/collate.py) when the attention runs variable-length
sequences natively, so no FLOP or byte is spent on padding or on the empty blocks between records:

- flash_attention_2: when the flash-attn package is installed (transformers' own integration);
- torch_varlen: otherwise, torch's `torch.nn.attention.varlen.varlen_attn` (flash kernels inside torch,
  no extra package), registered here with transformers' AttentionInterface under that name;
- flex_attention (transformers' document-masked flex path) only when `model.attn_implementation` asks:
  it compiles per shape, so its flattened rows are padded to one fixed length.

`model.attn_implementation` always wins. The automatic torch_varlen choice is checked once per
process against a plain per-sequence attention on random inputs; a mismatch or error keeps sdpa.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

from peftkit.errors import ModelError

logger = logging.getLogger("peftkit")

VARLEN = "torch_varlen"
# Implementations that run a flattened row of several records as separate sequences.
FLATTENING = ("flash_attention_2", "flash_attention_3", VARLEN, "flex_attention")
_self_check: dict[str, bool] = {}


def varlen_kernel() -> Any:
    """torch's varlen_attn, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def reference_varlen_attn(query: Any, key: Any, value: Any, cu_seq: Any, max_len: int, scale: float | None = None,
                          window: int | None = None) -> Any:
    """What varlen_attn computes, one sequence at a time with sdpa (causal): the CPU stand-in and the check's reference.
    Shapes as varlen_attn's: (tokens, heads, dim), cu_seq (sequences + 1,)."""
    import torch
    import torch.nn.functional as F

    out = []
    bounds = cu_seq.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))
        n = b - a
        mask = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        if window is not None:
            mask &= ~torch.ones(n, n, dtype=torch.bool, device=query.device).tril(-window - 1)
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=q.shape[0] != k.shape[0]).transpose(0, 1))
    return torch.cat(out)


@functools.lru_cache(maxsize=4)
def _parameters(kernel: Any) -> frozenset[str]:
    """The kernel's parameter names, read once (the attention runs per layer and step)."""
    return frozenset(inspect.signature(kernel).parameters)


def _call_varlen(query: Any, key: Any, value: Any, cu_seq: Any, max_len: int, scale: float,
                 window: int | None) -> Any:
    """varlen_attn with causal masking and GQA, across the signatures torch has shipped (checked by name)."""
    kernel = varlen_kernel()
    params = _parameters(kernel)
    kwargs: dict[str, Any] = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
        if window is not None and "window_size" in params:
            kwargs["window_size"] = (window, 0)
    elif "window_size" in params:
        kwargs["window_size"] = (window if window is not None else -1, 0)  # (-1, 0): causal
    else:
        raise ModelError("this torch's varlen_attn has no causal mode: set model.attn_implementation: sdpa")
    if window is not None and "window_size" not in params:
        raise ModelError("this torch's varlen_attn has no sliding window: set model.attn_implementation: sdpa")
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # the kernel's own scale is 1/sqrt(dim)
        query = query * (scale * query.shape[-1] ** 0.5)
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    try:
        return kernel(query, key, value, cu_seq, cu_seq, max_len, max_len, **kwargs)
    except RuntimeError as e:  # e.g. a head size or dtype the kernel does not take
        raise ModelError(f"torch_varlen attention failed on this model ({str(e).splitlines()[0][:200]}): set "
                         "model.attn_implementation: sdpa") from e


def _boundaries(position_ids: Any, batch: int, length: int, device: Any) -> tuple[Any, int]:
    """cu_seq and the longest sequence of rows whose records restart their position_ids at 0."""
    import torch

    if position_ids is None:
        starts = torch.arange(0, batch * length, length, device=device)
    else:
        pos = position_ids.expand(batch, -1).reshape(-1)
        first = torch.zeros_like(pos, dtype=torch.bool)
        first[::length] = True  # every row starts a sequence
        starts = ((pos[1:] != pos[:-1] + 1) | first[1:]).nonzero().squeeze(-1) + 1
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=device), starts])
    cu = torch.cat([starts, torch.tensor([batch * length], device=device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _attention_with_cache(query: Any, key: Any, value: Any, attention_mask: Any, scale: float) -> Any:
    """Generation (queries fewer than keys, a KV cache): plain sdpa with the causal offset and the padding mask."""
    import torch
    import torch.nn.functional as F

    q_len, k_len = query.shape[2], key.shape[2]
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -k_len:].bool()
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


def varlen_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                             **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function contract (query (B, H, S, D) in, (B, S, H, D) out) over varlen_attn.

    The sequences come from the collator's cu_seq_lens_q / max_length_q when it sends them (no host sync),
    else from position_ids restarts, else from a 2D padding mask (tokens gathered, run, scattered back).
    """
    import torch

    if dropout and module.training:
        raise ModelError("model.attn_implementation: torch_varlen has no attention dropout; use sdpa")
    batch, heads, length, dim = query.shape
    scale = scaling if scaling is not None else dim ** -0.5
    if key.shape[2] != length:
        return _attention_with_cache(query, key, value, attention_mask, scale), None
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    keep = None
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        keep = attention_mask.reshape(-1).bool().nonzero().squeeze(-1)
        q, k, v = q[keep], k[keep], v[keep]
        lengths = attention_mask.sum(-1).to(torch.int32)
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        max_len = int(lengths.max())
    elif kwargs.get("cu_seq_lens_q") is not None and batch == 1:
        cu, max_len = kwargs["cu_seq_lens_q"].to(torch.int32), int(kwargs["max_length_q"])
    else:
        cu, max_len = _boundaries(kwargs.get("position_ids"), batch, length, query.device)
    window = sliding_window - 1 if sliding_window else None
    out = _call_varlen(q, k, v, cu, max_len, scale, window)
    if keep is not None:
        full = out.new_zeros(batch * length, heads, dim)
        full[keep] = out
        out = full
    return out.reshape(batch, length, heads, dim), None


def register_varlen() -> None:
    """Make `torch_varlen` an attention implementation transformers accepts (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)  # no 4D mask: None, or the 2D padding mask


def varlen_works(device: str = "cuda") -> bool:
    """Once per process: torch_varlen equals per-sequence attention (bf16, GQA, forward and backward) on `device`."""
    if device in _self_check:
        return _self_check[device]
    import torch

    ok = False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        cu = torch.tensor([0, 37, 101, 128], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(128, h, 64, generator=gen).to(device, torch.bfloat16).requires_grad_()
                   for h in (8, 2, 2))
        out = _call_varlen(q, k, v, cu, 64, 0.125, None)
        out.float().square().sum().backward()
        ref = reference_varlen_attn(q.detach().float(), k.detach().float(), v.detach().float(), cu, 64, 0.125)
        ok = q.grad is not None and torch.allclose(out.float(), ref, atol=3e-2, rtol=3e-2)
        if not ok:
            logger.warning("torch_varlen attention does not match per-sequence attention on %s: using sdpa", device)
    except Exception as e:  # any failure of an optional kernel means: use sdpa
        logger.warning("torch_varlen attention failed its check on %s (%s): using sdpa", device, e)
    _self_check[device] = ok
    return ok


def choose_attention(requested: str | None, packing: bool, on_cuda: bool) -> str | None:
    """The attention implementation to load the model with (None: transformers' default, sdpa)."""
    if requested:
        return requested
    if not (packing and on_cuda):
        return None
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        return "flash_attention_2"
    if varlen_kernel() is not None and varlen_works():
        return VARLEN
    return None


def flattens(attn_implementation: str | None) -> bool:
    """Whether packed rows go in as one flattened row for this attention implementation."""
    return attn_implementation in FLATTENING

