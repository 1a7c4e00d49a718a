"""Messages → input_ids and labels, through the tokenizer's chat template. Labels are made only here.

The labels of assistant turn k are exactly the tokens between
render(messages[:k], add_generation_prompt=True) and render(messages[:k+1]). If the first is not a
token prefix of the second (a template that rewrites earlier turns), the record fails loudly rather
than being mislabelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.constants import IGNORE_INDEX
from peftkit.errors import DataError


@dataclass
class Segment:
    """A run of tokens that is either prompt (not supervised) or response (supervised)."""

    ids: list[int]
    supervised: bool


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def segment_messages(tokenizer: Any, messages: list[dict[str, str]], where: tuple[str, int]) -> list[Segment]:
    """Split the rendered conversation into prompt and response segments, checking the prefix property."""
    segments: list[Segment] = []
    done: list[int] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], generation_prompt=True)
        full = _render(tokenizer, messages[: k + 1], generation_prompt=False)
        if prompt[: len(done)] != done or full[: len(prompt)] != prompt:
            raise DataError(
                where[0], where[1], None,
                f"the chat template does not render assistant turn {k} as an extension of the conversation "
                "before it (render(messages[:k], add_generation_prompt=True) is not a token prefix of "
                "render(messages[:k+1])), so its labels cannot be placed exactly. Use a template that renders "
                "turns incrementally (data.template: chatml, llama3, alpaca or yuan2) or your own .jinja file.",
            )
        segments.append(Segment(prompt[len(done):], supervised=False))
        segments.append(Segment(full[len(prompt):], supervised=True))
        done = full
    return segments


def truncate_segments(segments: list[Segment], cutoff_len: int) -> tuple[list[Segment], bool]:
    """Fit (prompt, response) pairs into `cutoff_len`, turn by turn, keeping part of every kept response.

    A response keeps at least half the budget left when its turn starts (or all of itself if
    shorter); the prompt gives up the rest from its middle, so the template's head and the
    generation prompt at its end survive. Turns that no longer fit are dropped whole.
    Returns the segments and whether anything was cut.
    """
    kept: list[Segment] = []
    budget, cut = cutoff_len, False
    for i in range(0, len(segments), 2):
        source, target = segments[i].ids, segments[i + 1].ids
        if budget <= 1 or (kept and len(source) + min(len(target), 1) > budget):
            cut = True
            break
        target_keep = min(len(target), max(budget - len(source), budget // 2))
        source_keep = min(len(source), budget - target_keep)
        if source_keep < len(source):
            tail = source_keep // 2
            source = source[: source_keep - tail] + (source[-tail:] if tail else [])
        cut = cut or source_keep < len(segments[i].ids) or target_keep < len(target)
        kept += [Segment(source, False), Segment(target[:target_keep], True)]
        budget -= len(source) + target_keep
    return kept, cut


def encode_messages(
    tokenizer: Any, messages: list[dict[str, str]], cutoff_len: int, where: tuple[str, int]
) -> tuple[dict[str, list[int]] | None, bool]:
    """One training example: input_ids, attention_mask, labels (IGNORE_INDEX outside responses).

    Returns the example (None when no response token fits: the caller reports it) and whether
    it was truncated.
    """
    segments, cut = truncate_segments(segment_messages(tokenizer, messages, where), cutoff_len)
    input_ids: list[int] = []
    labels: list[int] = []
    for seg in segments:
        input_ids += seg.ids
        labels += seg.ids if seg.supervised else [IGNORE_INDEX] * len(seg.ids)
    if all(label == IGNORE_INDEX for label in labels):
        return None, True
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}, cut
