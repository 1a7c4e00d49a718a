"""Chat templates: the tokenizer's own, one shipped with peftkit, or a user's Jinja file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from peftkit.constants import SHIPPED_TEMPLATES
from peftkit.errors import ConfigError
from peftkit.stages import stage as stage_of

__all__ = ["SHIPPED_TEMPLATES", "apply_template", "stop_token_ids"]
# End-of-turn markers of common templates; generation stops at any of them that the vocabulary has.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<eod>", "<|endoftext|>", "<|end|>")


def apply_template(tokenizer: Any, template: str | None, stage: str = "sft") -> None:
    """Set `tokenizer.chat_template` from `data.template`; it is saved with the tokenizer, so exports keep it.

    pt (documents) and cls (texts) use no template, so the tokenizer need not have one.
    """
    if template is None and not stage_of(stage).chat_template:
        return
    if template is None:
        if not tokenizer.chat_template:
            raise ConfigError([
                "data.template: the tokenizer has no chat template — set data.template to one of "
                f"{', '.join(SHIPPED_TEMPLATES)} or to the path of a .jinja file"
            ])
        return
    if template in SHIPPED_TEMPLATES:
        tokenizer.chat_template = resources.files("peftkit.data").joinpath(f"templates/{template}.jinja").read_text()
    elif Path(template).is_file():
        tokenizer.chat_template = Path(template).read_text(encoding="utf-8")
    else:
        raise ConfigError([
            f"data.template={template!r}: neither a shipped template ({', '.join(SHIPPED_TEMPLATES)}) "
            "nor an existing .jinja file"
        ])


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus the end-of-turn tokens this vocabulary knows: generation stops at the first of them."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a lookup per token, not the whole vocabulary
        ids += [i for i in map(backend.token_to_id, _END_OF_TURN_TOKENS) if i is not None]
    else:
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab]
    return list(dict.fromkeys(ids))
