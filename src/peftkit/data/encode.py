"""Samples → input_ids and labels, through the tokenizer's chat template. Labels are made only here.

The labels of assistant turn k are exactly the tokens between
render(messages[:k], add_generation_prompt=True) and render(messages[:k+1]). If the first is not a
token prefix of the second (a template that rewrites earlier turns), the record fails loudly rather
than being mislabelled. Every text of a batch is tokenized in one call of the fast tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftkit.constants import IGNORE_INDEX
from peftkit.data.formats import Message, Sample, sft_messages
from peftkit.errors import DataError, PeftkitError

# Why an encoded record was dropped; the report counts each.
FULLY_MASKED = "fully masked: no supervised message (data.mask, `train: false`)"
DOES_NOT_FIT = "no response token fits in cutoff_len"
TEMPLATE = "chat template does not render turns incrementally"
TOO_SHORT = "document block shorter than 2 tokens"
NO_JUDGEMENT = "kto: `label` is not true / false"
PROMPT_TOO_LONG = "prompt longer than cutoff_len"


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


_VERIFIED_TEMPLATES: set[str] = set()  # templates whose fast rendering matched apply_chat_template in this process


def _renderer(tokenizer: Any, first: list[Message] | None = None) -> Any:
    """render(messages, add_generation_prompt) as apply_chat_template renders, without its per-call overhead.

    The template is the one transformers compiles (same Jinja environment and globals) with the same
    variables (the special tokens), through a private transformers function. So that a transformers
    release that renders differently cannot pass unnoticed, the first conversation of each template is
    rendered both ways once per process, and a difference raises.
    """
    public = lambda messages, gen: tokenizer.apply_chat_template(messages, tokenize=False,  # noqa: E731
                                                                  add_generation_prompt=gen)
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tokenizer.chat_template)
        special = dict(tokenizer.special_tokens_map)
    except (ImportError, AttributeError, TypeError):  # another transformers: take the public path
        return public
    fast = lambda messages, gen: template.render(messages=messages, add_generation_prompt=gen, **special)  # noqa: E731
    if first is not None and tokenizer.chat_template not in _VERIFIED_TEMPLATES:
        plain = [{"role": m["role"], "content": m["content"]} for m in first]
        if fast(plain, False) != public(plain, False):
            raise PeftkitError("data.template: peftkit's fast chat-template rendering differs from "
                               "tokenizer.apply_chat_template for this template with this transformers version; "
                               "please report it (peftkit/data/encode.py: _renderer)")
        _VERIFIED_TEMPLATES.add(tokenizer.chat_template)
    return fast


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one call of the Rust tokenizer (no offsets: not needed here)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of the conversation so far plus the assistant's generation prompt, rendered and tokenized
    exactly as training renders a prompt (eval, chat, serve and export's check all use this)."""
    plain: list[Message] = [{"role": m["role"], "content": m["content"]} for m in messages]
    return _tokenize(tokenizer, [_renderer(tokenizer, plain or None)(plain, True)])[0]


def _texts(render: Any, messages: list[Message]) -> list[str]:
    """For each assistant turn: the prompt rendering, then the rendering that includes the turn."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    texts = []
    for k, m in enumerate(plain):
        if m["role"] == "assistant":
            texts += [render(plain[:k], True), render(plain[: k + 1], False)]
    return texts


def segment_messages(
    messages: list[Message], renders: list[list[int]], mask: str, where: tuple[str, int | str]
) -> list[Segment]:
    """Prompt / response segments from the token renderings of `_texts`, with supervision from `mask`."""
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    segments: list[Segment] = []
    done: list[int] = []
    for n, k in enumerate(turns):
        prompt, full = renders[2 * n], renders[2 * n + 1]
        if prompt[: len(done)] != done or full[: len(prompt)] != prompt:
            raise DataError(
                where[0], where[1], None,
                f"{TEMPLATE}: render(messages[:{k}], add_generation_prompt=True) is not a token prefix of "
                f"render(messages[:{k + 1}]), so the labels of assistant turn {k} cannot be placed exactly. Use a "
                "template that renders turns incrementally (data.template: chatml, llama3, alpaca or yuan2) or your "
                "own .jinja file.",
            )
        trains = messages[k].get("train", True) and (mask != "last" or n == len(turns) - 1)
        segments.append(Segment(prompt[len(done):], supervised=mask == "all"))
        segments.append(Segment(full[len(prompt):], supervised=bool(trains)))
        done = full
    return segments


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


def _conversation(messages: list[Message], renders: list[list[int]], cutoff_len: int, mask: str,
                  where: tuple[str, int | str]) -> Encoded:
    pairs = _pairs(segment_messages(messages, renders, mask, where))
    if not pairs:
        return Encoded([], [], drop=FULLY_MASKED)
    kept, cut = truncate_segments(pairs, cutoff_len)
    input_ids: list[int] = []
    labels: list[int] = []
    for seg in kept:
        input_ids += seg.ids
        labels += seg.ids if seg.supervised else [IGNORE_INDEX] * len(seg.ids)
    if all(label == IGNORE_INDEX for label in labels):
        return Encoded([], [], truncated=True, drop=DOES_NOT_FIT)
    return Encoded(input_ids, labels, truncated=cut)


def _document(ids: list[int], cutoff_len: int) -> list[Encoded]:
    """A document cut into blocks of cutoff_len, every token supervised: nothing is thrown away."""
    blocks = [ids[i : i + cutoff_len] for i in range(0, len(ids), cutoff_len)]
    return [Encoded(b, list(b)) if len(b) > 1 else Encoded([], [], drop=TOO_SHORT) for b in blocks]


def encode_samples(
    tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]], cutoff_len: int,
    mask: str = "assistant", strict: bool = True,
) -> list[list[Encoded]]:
    """The examples of each sample (one, or several blocks for a long document; dropped ones carry a reason).

    strict=False turns a template error into a dropped record instead of raising it.
    """
    conversations = [sft_messages(s) for s in samples]
    first = next((m for m in conversations if m is not None), None)
    render = _renderer(tokenizer, first) if first is not None else None
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for sample, messages in zip(samples, conversations):
        start = len(texts)
        texts += _texts(render, messages) if messages is not None else [sample["text"]]
        spans.append((start, len(texts)))
    ids = _tokenize(tokenizer, texts) if texts else []
    out: list[list[Encoded]] = []
    for messages, (start, end), where in zip(conversations, spans, wheres):
        if messages is None:
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            out.append(_document(ids[start] + eos, cutoff_len))
            continue
        try:
            out.append([_conversation(messages, ids[start:end], cutoff_len, mask, where)])
        except DataError:
            if strict:
                raise
            out.append([Encoded([], [], drop=TEMPLATE)])
    return out


def encode_messages(
    tokenizer: Any, messages: list[Message], cutoff_len: int, where: tuple[str, int | str], mask: str = "assistant"
) -> tuple[dict[str, Any] | None, bool]:
    """One conversation as {input_ids, labels}, or None when nothing supervised fits; and whether it was cut."""
    (encoded,) = encode_samples(tokenizer, [{"messages": messages}], [where], cutoff_len, mask)[0]
    if encoded.drop:
        return None, encoded.truncated
    return {"input_ids": encoded.input_ids, "labels": encoded.labels}, encoded.truncated


def encode_preferences(
    tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]], cutoff_len: int, strict: bool = True,
) -> list[Encoded]:
    """Preference pairs: the chosen conversation as input_ids / labels, the rejected one as rejected_*.

    Only the final answer is supervised (mask `last`): rm reads its score after it, dpo sums its
    log-probabilities. Each side is truncated on its own, keeping part of its answer.
    """
    sides = [encode_samples(tokenizer, [{"messages": [*s["messages"], s[key]]} for s in samples], wheres, cutoff_len,
                            "last", strict) for key in ("chosen", "rejected")]
    out = []
    for (chosen,), (rejected,) in zip(*sides):
        truncated = chosen.truncated or rejected.truncated
        if chosen.drop or rejected.drop:
            out.append(Encoded([], [], truncated, drop=chosen.drop or rejected.drop))
        else:
            out.append(Encoded(chosen.input_ids, chosen.labels, truncated, extra={
                "rejected_input_ids": rejected.input_ids, "rejected_labels": rejected.labels}))
    return out


def encode_unpaired(
    tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]], cutoff_len: int, strict: bool = True,
) -> list[list[Encoded]]:
    """kto: each conversation with its final answer supervised (mask `last`) and `desirable` (1 / 0) from the
    record's `label`; a preference pair gives two examples, its chosen answer desirable, its rejected one not."""
    conversations: list[Sample] = []
    judged: list[tuple[int, int | None]] = []  # (sample index, desirable)
    for i, (sample, where) in enumerate(zip(samples, wheres)):
        if "chosen" in sample:
            for key, side in (("chosen", 1), ("rejected", 0)):
                conversations.append({"messages": [*sample["messages"], sample[key]]})
                judged.append((i, side))
            continue
        label = sample.get("desirable")
        flag: int | None = int(label) if isinstance(label, bool) or label in (0, 1) else None
        if flag is None and strict:
            shown = "it is missing" if label is None else f"got {label!r}"
            raise DataError(where[0], where[1], "label", f"stage kto needs true (a desirable answer) or false (an "
                            f"undesirable one), {shown}; map your field with `columns: {{label: YOUR_FIELD}}`")
        conversations.append(sample)
        judged.append((i, flag))
    encoded = encode_samples(tokenizer, conversations, [wheres[i] for i, _ in judged], cutoff_len, "last", strict)
    out: list[list[Encoded]] = [[] for _ in samples]
    for (example,), (i, desirable) in zip(encoded, judged):
        if desirable is None:
            example = Encoded([], [], drop=NO_JUDGEMENT)
        elif not example.drop:
            example.extra = {"desirable": desirable}
        out[i].append(example)
    return out


def encode_prompts(tokenizer: Any, samples: list[Sample], cutoff_len: int) -> list[Encoded]:
    """grpo: the conversation before its last answer, rendered with the generation prompt, as input_ids (nothing
    supervised: the answers are sampled); the last user message as `prompt` and the record's own answer as
    `reference`, for the reward functions. A prompt longer than cutoff_len is dropped."""
    conversations = [sft_messages(s) or [] for s in samples]
    prompts: list[list[Message]] = [[{"role": m["role"], "content": m["content"]} for m in c[:-1]] for c in conversations]
    render = _renderer(tokenizer, prompts[0] if prompts else None)
    ids = _tokenize(tokenizer, [render(p, True) for p in prompts]) if prompts else []
    out = []
    for conversation, prompt, row in zip(conversations, prompts, ids):
        if len(row) > cutoff_len:
            out.append(Encoded([], [], drop=PROMPT_TOO_LONG))
            continue
        last_user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
        out.append(Encoded(row, [IGNORE_INDEX] * len(row),
                           extra={"prompt": last_user, "reference": conversation[-1]["content"]}))
    return out


UNKNOWN_CLASS = "label not among the training data's classes"


def class_names(labels: list[int | str]) -> list[str]:
    """Class names by index: 0..max for integer labels (or digit strings, as in GLUE TSVs), else sorted names."""
    if all(isinstance(x, int) or str(x).isdigit() for x in labels):
        return [str(i) for i in range(max(int(x) for x in labels) + 1)]
    return sorted({str(x) for x in labels})


def class_id(label: int | str, classes: list[str]) -> int | None:
    name = str(int(label)) if isinstance(label, int) or str(label).isdigit() else str(label)
    return classes.index(name) if name in classes else None


def encode_classification(
    tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]], cutoff_len: int, classes: list[str],
    strict: bool = True,
) -> list[Encoded]:
    """text (+ text_pair) → input_ids and the class index as `labels`.

    Encoders join a pair with their own template ([CLS] a [SEP] b [SEP], with token_type_ids);
    decoders, which have none, read the two texts on separate lines.
    """
    pair_template = tokenizer.num_special_tokens_to_add(pair=True) > 0
    out = []
    for sample, where in zip(samples, wheres):
        label = class_id(sample["label"], classes)
        if label is None:
            if strict:
                raise DataError(where[0], where[1], "label", f"{sample['label']!r} is not one of the classes of the "
                                f"training data ({', '.join(classes)})")
            out.append(Encoded([], [], drop=UNKNOWN_CLASS))
            continue
        text, pair = sample["text"], sample["text_pair"]
        if pair is not None and not pair_template:
            text, pair = f"{text}\n{pair}", None
        enc = tokenizer(text, pair)
        truncated = len(enc["input_ids"]) > cutoff_len
        if truncated:  # the tokenizer's own pair truncation (longest first) keeps both texts' special tokens
            enc = tokenizer(text, pair, truncation=True, max_length=cutoff_len)
        extra = {"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}
        out.append(Encoded(enc["input_ids"], label, truncated=truncated, extra=extra))
    return out


# The stage table's encoders (peftkit/stages.py): the examples of each sample, under `options`
# (data/dataset.py's Encoding: cutoff_len, mask, classes, strict).
def conversation_examples(tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]],
                          options: Any) -> list[list[Encoded]]:
    return encode_samples(tokenizer, samples, wheres, options.cutoff_len, options.mask, options.strict)


def preference_examples(tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]],
                        options: Any) -> list[list[Encoded]]:
    return [[e] for e in encode_preferences(tokenizer, samples, wheres, options.cutoff_len, options.strict)]


def unpaired_examples(tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]],
                      options: Any) -> list[list[Encoded]]:
    return encode_unpaired(tokenizer, samples, wheres, options.cutoff_len, options.strict)


def prompt_examples(tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]],
                    options: Any) -> list[list[Encoded]]:
    return [[e] for e in encode_prompts(tokenizer, samples, options.cutoff_len)]


def class_examples(tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]],
                   options: Any) -> list[list[Encoded]]:
    return [[e] for e in encode_classification(tokenizer, samples, wheres, options.cutoff_len,
                                               options.classes or [], options.strict)]
