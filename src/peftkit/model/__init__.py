"""Model: resolve a name to a folder, load it, and decide what trains."""

from peftkit.model.finetuning import count_parameters, prepare_for_training
from peftkit.model.loading import load_model, load_stage_model, load_tokenizer
from peftkit.model.resolve import ensure_embedded_model, peftkit_home, resolve_model

__all__ = [
    "count_parameters",
    "ensure_embedded_model",
    "load_model",
    "load_stage_model",
    "load_tokenizer",
    "peftkit_home",
    "prepare_for_training",
    "resolve_model",
]
