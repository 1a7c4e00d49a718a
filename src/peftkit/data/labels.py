"""Renderings → input_ids and labels: the only place labels are made.

The labels of assistant turn k are exactly the tokens between
render(messages[:k], add_generation_prompt=True) and render(messages[:k+1]), the record's tools passed
as `apply_chat_template(tools=...)` passes them. If the first is not a token prefix of the second, the
record fails loudly rather than being mislabelled. A template that shows earlier turns differently from
the last one (as reasoning templates that drop past thinking do) is rendered turn by turn: when the
prompt of turn k does not continue the text so far, turn k starts a new example whose prompt is the
history exactly as the template shows it at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftkit.constants import IGNORE_INDEX
from peftkit.data.formats import Message
from peftkit.data.render import template_messages
from peftkit.errors import DataError

# Why an encoded record was dropped; the report counts each.
FULLY_MASKED = "fully masked: no supervised message (data.mask, `train: false`)"
DOES_NOT_FIT = "no response token fits in cutoff_len"
TEMPLATE = "chat template does not render turns incrementally"
TOO_SHORT = "document block shorter than 2 tokens"
NO_JUDGEMENT = "kto: `label` is not true / false"
PROMPT_TOO_LONG = "prompt longer than cutoff_len"
UNKNOWN_CLASS = "label not among the training data's classes"
IMAGE_CUT = "cutoff_len would cut through an image's tokens"


@dataclass
class Segment:
    """A run of tokens that is either prompt (not supervised) or response (supervised)."""

    ids: list[int]
    supervised: bool


@dataclass
class Encoded:
    """One example, or the reason its record was dropped (then ids and labels are empty)."""

    input_ids: list[int]
    labels: list[int] | int  # token labels; for cls the class index
    truncated: bool = False
    drop: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # stage columns: rejected_input_ids, token_type_ids


_SENTINEL = "\u2063peftkit-answer\u2063"  # marks where an answer's content starts in a rendering


def turn_texts(render: Any, messages: list[Message], tools: list[dict] | None, reasoning: str,
               where: tuple[str, int | str]) -> list[str]:
    """For each assistant turn: the prompt rendering, the rendering that includes the turn, and (data.reasoning
    mask, a turn with reasoning) the latter cut where the turn's content starts, else ""."""
    plain = template_messages(messages, reasoning)
    texts = []
    for k, m in enumerate(plain):
        if m["role"] != "assistant":
            continue
        full = render(plain[: k + 1], False, tools)
        thought = ""
        if reasoning == "mask" and m.get("reasoning_content"):
            marked = render([*plain[:k], {**m, "content": _SENTINEL}], False, tools)
            cut = marked.find(_SENTINEL)
            if cut < 0 or full[:cut] != marked[:cut]:
                raise DataError(where[0], where[1], None, f"data.reasoning=mask: the chat template does not render "
                                f"assistant turn {k}'s reasoning before its content, so the reasoning cannot be told "
                                "apart from the answer; use data.reasoning train or drop")
            thought = full[:cut]
        texts += [render(plain[:k], True, tools), full, thought]
    return texts


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def segment_messages(
    messages: list[Message], renders: list[list[int]], mask: str, where: tuple[str, int | str]
) -> list[list[Segment]]:
    """Prompt / response segments from the token renderings of `turn_texts`, with supervision from `mask`: one list
    per example (one, unless the template shows the history differently from the last turn)."""
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    examples: list[list[Segment]] = []
    done: list[int] | None = None
    for n, k in enumerate(turns):
        prompt, full, thought = renders[3 * n], renders[3 * n + 1], renders[3 * n + 2]
        if full[: len(prompt)] != prompt:
            raise DataError(
                where[0], where[1], None,
                f"{TEMPLATE}: render(messages[:{k}], add_generation_prompt=True) is not a token prefix of "
                f"render(messages[:{k + 1}]), so the labels of assistant turn {k} cannot be placed exactly. Use a "
                "template that renders turns incrementally (data.template: chatml, llama3, alpaca or yuan2) or your "
                "own .jinja file.",
            )
        if done is None or prompt[: len(done)] != done:  # the history shows differently now: a new example
            examples.append([])
            done = []
        trains = messages[k].get("train", True) and (mask != "last" or n == len(turns) - 1)
        segments = examples[-1]
        segments.append(Segment(prompt[len(done):], supervised=mask == "all"))
        start = max(len(prompt), _common(thought, full)) if thought else len(prompt)  # masked reasoning
        segments.append(Segment(full[len(prompt):start], supervised=mask == "all"))
        segments.append(Segment(full[start:], supervised=bool(trains)))
        done = full
    return examples


def _pairs(segments: list[Segment]) -> list[Segment]:
    """Alternating (prompt, response) segments: runs with the same supervision merged, an unsupervised tail dropped."""
    merged: list[Segment] = []
    for seg in segments:
        if merged and merged[-1].supervised == seg.supervised:
            merged[-1] = Segment(merged[-1].ids + seg.ids, seg.supervised)
        else:
            merged.append(Segment(list(seg.ids), seg.supervised))
    if merged and merged[0].supervised:
        merged.insert(0, Segment([], False))
    if merged and not merged[-1].supervised:
        merged.pop()  # tokens after the last supervised one change no loss
    return merged


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


def label_conversation(messages: list[Message], renders: list[list[int]], cutoff_len: int, mask: str,
                       where: tuple[str, int | str]) -> list[Encoded]:
    """The examples of one conversation from the token renderings of `turn_texts`: prompts masked with
    IGNORE_INDEX, each fitted into cutoff_len (a dropped one says why)."""
    out = []
    for segments in segment_messages(messages, renders, mask, where):
        pairs = _pairs(segments)
        if not pairs:
            continue  # an example with nothing supervised (mask last, `train: false`) teaches nothing
        kept, cut = truncate_segments(pairs, cutoff_len)
        input_ids: list[int] = []
        labels: list[int] = []
        for seg in kept:
            input_ids += seg.ids
            labels += seg.ids if seg.supervised else [IGNORE_INDEX] * len(seg.ids)
        if all(label == IGNORE_INDEX for label in labels):
            out.append(Encoded([], [], truncated=True, drop=DOES_NOT_FIT))
        else:
            out.append(Encoded(input_ids, labels, truncated=cut))
    return out or [Encoded([], [], drop=FULLY_MASKED)]


def label_document(ids: list[int], cutoff_len: int) -> list[Encoded]:
    """A document cut into blocks of cutoff_len, every token supervised: nothing is thrown away."""
    blocks = [ids[i : i + cutoff_len] for i in range(0, len(ids), cutoff_len)]
    return [Encoded(b, list(b)) if len(b) > 1 else Encoded([], [], drop=TOO_SHORT) for b in blocks]


def unsupervised(input_ids: list[int], labels: list[int], token_ids: set[int]) -> list[int]:
    """The labels with every position holding one of `token_ids` (an image's tokens) left out of the loss."""
    return [IGNORE_INDEX if t in token_ids else label for t, label in zip(input_ids, labels)]
