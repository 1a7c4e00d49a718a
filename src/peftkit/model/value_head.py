"""The reward model's value head: one linear layer from the last hidden state to a score.

It lives on the causal LM as `v_head` (so the optimizer, devices and checkpoints see it) and is
saved on its own as value_head.safetensors beside the adapter or the full weights: a reward
model is the base model + adapter (or full weights) + this file.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftkit.constants import VALUE_HEAD_FILE
from peftkit.errors import ModelError

HEAD = "v_head"


def causal_lm(model: Any) -> Any:
    """The transformers model inside a DDP wrapper and / or a PeftModel (or the model itself)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def hidden_states_as_logits(causal_lm: Any):
    """Inside, the model's output layer passes its input through (the forward returns hidden states): the scores
    here and train/loss.py's chunked loss read hidden states without vocabulary-sized logits."""
    head = causal_lm.get_output_embeddings()
    head.forward = lambda hidden: hidden
    try:
        yield head
    finally:
        del head.forward  # back to the class's forward


def attach_value_head(model: Any) -> Any:
    """Add a trainable value head (seeded by the caller's seed) in the model's dtype and device."""
    import torch

    lm = causal_lm(model)
    weight = lm.get_output_embeddings().weight
    head = torch.nn.Linear(lm.config.hidden_size, 1, dtype=weight.dtype, device=weight.device)
    torch.nn.init.normal_(head.weight, std=1 / (lm.config.hidden_size + 1))
    torch.nn.init.zeros_(head.bias)
    setattr(lm, HEAD, head)
    return model


def value_head(model: Any) -> Any | None:
    return getattr(causal_lm(model), HEAD, None)


def ensure_value_head(model: Any) -> Any:
    """The model's value head, attached first if it has none."""
    head = value_head(model)
    return head if head is not None else getattr(causal_lm(attach_value_head(model)), HEAD)


def save_value_head(model: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    head = value_head(model)
    if head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(Path(folder) / VALUE_HEAD_FILE))


def load_value_head(model: Any, folder: str | Path) -> Any:
    """Attach the value head saved in `folder` (a trained rm output_dir or checkpoint)."""
    from safetensors.torch import load_file

    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise ModelError(f"{folder}: no {VALUE_HEAD_FILE} — is it the output_dir of a `stage: rm` run?")
    head = ensure_value_head(model)
    state = load_file(str(path), device=str(head.weight.device))
    head.load_state_dict({k: v.to(head.weight.dtype) for k, v in state.items()})
    return model


def without_value_head(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A full-weights state dict without the head, so the saved model stays a plain causal LM."""
    return {k: v for k, v in state_dict.items() if not k.startswith(f"{HEAD}.") and f".{HEAD}." not in k}


def scores(hidden: Any, attention_mask: Any, head: Any) -> Any:
    """The head's score at each row's last non-padding token (rows are right padded)."""
    import torch

    last = attention_mask.sum(-1) - 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()
