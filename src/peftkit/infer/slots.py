"""The engine's KV cache: one preallocated tensor per layer, [slots, kv_heads, max_len, head_dim] (`_SlotLayer`, a
transformers cache layer), and the bookkeeping of its rows (`SlotCache`).

Active requests are rows 0..n-1; all share one write column `t`: row r holds its tokens in columns [first[r], t),
and the attention mask is True exactly there. A new request is prefilled into a free row at columns [t - len, t);
a finished row is replaced by the last active row; when the dead columns on the left grow, everything shifts
left. Attention reads only columns [0, t + 1).
"""

from __future__ import annotations

from typing import Any


class SlotCache:
    """`slots` rows of up to `max_len` columns over every layer, with each row's mask, next position, first column
    and the token it feeds next. The engine keeps which job is in which row and says how many rows are in use (n)."""

    def __init__(self, slots: int, max_len: int, num_layers: int, device: Any) -> None:
        import torch
        from transformers.cache_utils import Cache

        self.max_len, self.device = max_len, device
        self.layers = [_SlotLayer(slots, max_len) for _ in range(num_layers)]
        self.cache = Cache(layers=self.layers)  # what the model's forward gets
        self.mask = torch.zeros(slots, max_len, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # next position per row
        self.first = [0] * slots  # first column of each active row
        self.last = torch.zeros(slots, dtype=torch.long, device=device)  # the token each row feeds next
        self.t = 0  # the shared write column

    def point(self, rows: tuple[int, int], pointer: int) -> None:
        """The next forward reads and writes rows [rows) from column `pointer`."""
        for layer in self.layers:
            layer.rows, layer.pointer = rows, pointer

    def prefill(self, n: int, prompts: list[list[int]], p: int, w: int, pad: int,
                prefix_kv: list[tuple[Any, Any]] | None) -> tuple[Any, Any]:
        """Rows n.. set up for `prompts` (room made on the left first), ending at column t: their masks, first
        columns and next positions. With `p` prefix tokens every prompt starts with, the prefix's keys and
        values (`prefix_kv`, per layer) are copied in at [t - w - p, t - w) and the pads between are masked.
        Returns the ids and positions the prefill computes, [len(prompts), w]: the rest of each prompt, left padded."""
        import torch

        width = p + w
        self._make_room(n, width)
        a, b, t = n, n + len(prompts), self.t
        ids = torch.full((len(prompts), w), pad, dtype=torch.long)
        positions = torch.zeros(len(prompts), w, dtype=torch.long)
        self.mask[a:b] = 0
        for k, prompt in enumerate(prompts):
            m = len(prompt)
            ids[k, w - (m - p) :] = torch.tensor(prompt[p:])
            positions[k, w - (m - p) :] = torch.arange(p, m)
            self.mask[a + k, t - (m - p) : t] = 1
            self.first[a + k], self.positions[a + k] = (t - width if p else t - m), m
        if p:
            assert prefix_kv is not None
            self.mask[a:b, t - width : t - w] = 1
            for layer, (keys, values) in zip(self.layers, prefix_kv):
                if not layer.is_initialized:
                    layer.lazy_initialization(keys, values)
                layer.keys[a:b, :, t - width : t - w] = keys
                layer.values[a:b, :, t - width : t - w] = values
        return ids.to(self.device), positions.to(self.device)

    def next_column(self, n: int) -> int:
        """The column the decode step of rows [0, n) writes, unmasked for them (compacted first when crowded)."""
        if self.crowded(n):
            self.compact(n)
        t = self.t
        self.mask[:n, t] = 1
        self.t += 1
        return t

    def release(self, row: int, last: int) -> None:
        """`row` freed: the last row in use, `last`, moves into it (its keys, values and bookkeeping)."""
        if row != last:
            t = self.t
            for layer in self.layers:
                if layer.is_initialized:
                    layer.keys[row, :, :t] = layer.keys[last, :, :t]
                    layer.values[row, :, :t] = layer.values[last, :, :t]
            self.mask[row] = self.mask[last]
            self.positions[row], self.last[row], self.first[row] = self.positions[last], self.last[last], self.first[last]
        self.mask[last] = 0
        if last == 0:  # no row in use
            self.t = 0

    def clear(self) -> None:
        """No row in use (after a failed step)."""
        self.t = 0
        self.mask.zero_()

    def shift(self, n: int, delta: int) -> None:
        """Move rows [0, n)'s columns [0, t) by `delta` (right > 0, left < 0)."""
        t = self.t
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

    def crowded(self, n: int) -> bool:
        """No column left for the next step, or more than half the columns read are dead (and at least 64)."""
        dead = min(self.first[:n]) if n else 0
        return self.t + 1 > self.max_len or dead > max(64, self.t // 2)

    def compact(self, n: int) -> None:
        """Drop the columns no row in use needs any more on the left."""
        if n:
            self.shift(n, -min(self.first[:n]))

    def _make_room(self, n: int, width: int) -> None:
        """At least `width` columns left of t for a prefill (the rows in use moved right), compacted when crowded."""
        if self.t < width:
            self.shift(n, width - self.t)
        elif self.crowded(n):
            self.compact(n)
            if self.t < width:
                self.shift(n, width - self.t)


class _SlotLayer:
    """A transformers cache layer over rows [rows) of a preallocated buffer, written at column `pointer`.

    Built on transformers' public cache-layer interface (CacheLayerMixin: update / get_mask_sizes /
    get_seq_length); `SlotCache.point` moves `rows` and `pointer` before every forward."""

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
