"""Packed rows proven isolated on the model itself, for a family the family tier has not proven.

Restarting position_ids isolates a packed row's records only where the family's forward builds its attention
mask from them (and has no layer that carries state across tokens outside attention: those are refused earlier,
model/families.py). A family the tier has not run gets this check before training: two short records packed
into one row through the run's own collator, the second's logits against the same record alone.
"""

from __future__ import annotations

from typing import Any

from peftkit.data.packing import pack_row
from peftkit.errors import ConfigError

# |packed - alone| / max|alone| over the second record's logits: float rounding stays near 1e-6 in float32 (at most
# 1.5e-6 on the family tier's models), 1e-2 in half precision; a record that sees its neighbour moves them by more
# (3.5e-4 to 0.9 on the tier's leaking families, at random weights).
LIMITS = {"float32": 1e-4, "float64": 1e-4}
HALF_LIMIT = 3e-2


def packed_leak(model: Any, collator: Any) -> float:
    """The second record's largest relative logit difference, packed behind a first record against alone."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    first = [(7 * i + 3) % vocab for i in range(12)]
    second = [(11 * i + 5) % vocab for i in range(9)]
    batch = collator([pack_row([{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}])])
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**batch).logits[0, len(first): len(first) + len(second)].float()
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    return float((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-6))


def check_packed_isolation(model: Any, collator: Any) -> None:
    """Refuses `data.packing` (exit 2) when this model's records would see each other in a packed row."""
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    limit = LIMITS.get(dtype, HALF_LIMIT)
    leak = packed_leak(model, collator)
    if leak > limit:
        model_type = getattr(model.config, "model_type", "this model")
        raise ConfigError([f"data.packing: in {model_type}, a packed record's logits change with the record before "
                           f"it ({leak:.2g} relative, limit {limit:g}): its forward does not isolate packed records "
                           "(it builds the attention mask without position_ids, or carries state across tokens). "
                           "Set data.packing: false (batches are then padded per record)"])
