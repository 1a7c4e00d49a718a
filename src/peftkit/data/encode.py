"""The stage encoders: samples → the examples each stage trains on, under one Encoding.

Each `encode_*` here is what the stage table (peftkit/stages.py) names as a stage's encoder, called as
(tokenizer, samples, wheres, Encoding) and returning the examples of each sample. Rendering is
data/render.py's, labels are data/labels.py's; every text of a batch is tokenized in one call of the fast
tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from peftkit.constants import IGNORE_INDEX
from peftkit.data.formats import Message, Sample, sft_messages
from peftkit.data.labels import (
    IMAGE_CUT,
    NO_JUDGEMENT,
    PROMPT_TOO_LONG,
    TEMPLATE,
    UNKNOWN_CLASS,
    Encoded,
    label_conversation,
    label_document,
    turn_texts,
    unsupervised,
)
from peftkit.data.render import (
    adds_special_tokens,
    check_template_shows,
    image_renderer,
    renderer,
    template_messages,
    tokenize,
)
from peftkit.errors import ConfigError, DataError
from peftkit.model.loading import has_images
from peftkit.stages import stage as stage_of


@dataclass
class Encoding:
    """How a stage turns samples into examples (picklable: worker processes receive it)."""

    cutoff_len: int
    mask: str = "assistant"
    stage: str = "sft"
    classes: list[str] | None = None  # cls: class names by index
    strict: bool = True  # a template error raises (on_bad_record: error) or drops the record
    reasoning: str = "train"  # data.reasoning: train | mask | drop
    processor: Any = None  # an image-text model's processor: records with images are encoded through it

    def __call__(self, tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, str]]) -> list[list[Encoded]]:
        return stage_of(self.stage).load("encoder")(tokenizer, samples, wheres, self)


Wheres = list[tuple[str, int | str]]  # (file, location) of each sample


def encode_samples(tokenizer: Any, samples: list[Sample], wheres: Wheres, options: Encoding) -> list[list[Encoded]]:
    """sft / pt: the examples of each sample (one, several blocks for a long document, or one per turn under a
    template that shows history differently; dropped ones carry a reason).

    options.strict=False turns a template error into a dropped record instead of raising it.
    """
    if has_images(options.processor) or any(s.get("images") for s in samples):
        return _through_processor(tokenizer, samples, wheres, options)
    conversations = [sft_messages(s) for s in samples]
    first = next(((m, s.get("tools")) for m, s in zip(conversations, samples) if m is not None), None)
    render = renderer(tokenizer, *first) if first is not None else None
    if render is not None:
        check_template_shows(tokenizer.chat_template, render, samples, options.reasoning)
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    failed: dict[int, DataError] = {}
    for n, (sample, messages) in enumerate(zip(samples, conversations)):
        start = len(texts)
        if messages is None:
            texts.append(sample["text"])
        else:
            try:
                texts += turn_texts(render, messages, sample.get("tools"), options.reasoning, wheres[n])
            except DataError as e:
                failed[n] = e
        spans.append((start, len(texts)))
    ids = tokenize(tokenizer, texts) if texts else []
    out: list[list[Encoded]] = []
    for n, (messages, (start, end), where) in enumerate(zip(conversations, spans, wheres)):
        if messages is None:
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            out.append(label_document(ids[start] + eos, options.cutoff_len))
            continue
        try:
            if n in failed:
                raise failed[n]
            out.append(label_conversation(messages, ids[start:end], options.cutoff_len, options.mask, where))
        except DataError:
            if options.strict:
                raise
            out.append([Encoded([], [], drop=TEMPLATE)])
    return out


def _through_processor(tokenizer: Any, samples: list[Sample], wheres: Wheres,
                       options: Encoding) -> list[list[Encoded]]:
    """encode_samples for an image-text model: every conversation (with images or not) through its processor, as
    inference renders it; documents as text."""
    if not has_images(options.processor):
        raise ConfigError(["data: the records have images, but the model has no image processor (it is not an "
                           "image-text checkpoint, or its folder lacks the processor's files); use an image-text "
                           "model, or data without images"])
    documents = [n for n, s in enumerate(samples) if sft_messages(s) is None]
    out: list[list[Encoded]] = [[] for _ in samples]
    text_only = replace(options, processor=None)
    for n, examples in zip(documents, encode_samples(tokenizer, [samples[n] for n in documents],
                                                      [wheres[n] for n in documents], text_only) if documents else []):
        out[n] = examples
    from peftkit.data.images import image_token_ids

    marks = image_token_ids(options.processor)
    for n, sample in enumerate(samples):
        if n in documents:
            continue
        try:
            out[n] = encode_image_sample(options.processor, sample, wheres[n], options, marks)
        except DataError:
            if options.strict:
                raise
            out[n] = [Encoded([], [], drop=TEMPLATE)]
    return out


def encode_image_sample(processor: Any, sample: Sample, where: tuple[str, int | str], options: Encoding,
                        marks: set[int]) -> list[Encoded]:
    """One conversation of an image-text run (with images or not) as its example: rendered by the processor's chat
    template, each rendering tokenized by the processor (which expands each image into its tokens), labelled by
    data/labels.py with the image tokens never supervised; `images` (the references) rides along for the collator
    (`marks`: the processor's image token ids).

    Truncation that would cut an image's tokens drops the record (IMAGE_CUT): a half image is not an input the
    model can read."""
    from peftkit.data.images import load_image

    messages = sft_messages(sample) or []
    try:
        pictures = [load_image(ref) for ref in sample.get("images", [])]
    except ValueError as e:
        raise DataError(where[0], where[1], "images", str(e)) from None
    render = image_renderer(processor)
    check_template_shows(processor.chat_template, render, [sample], options.reasoning)
    texts = turn_texts(render, messages, sample.get("tools"), options.reasoning, where)
    seen, before = 0, []  # images shown before each assistant turn
    for m in messages:
        if m["role"] == "assistant":
            before.append(seen)
        elif isinstance(m["content"], list):
            seen += sum(p["type"] == "image" for p in m["content"])
    ids = [processor_ids(processor, t, pictures[: before[n // 3]]) if t else [] for n, t in enumerate(texts)]
    if not pictures:
        return label_conversation(messages, ids, options.cutoff_len, options.mask, where)
    whole = label_conversation(messages, ids, 2**31, options.mask, where)  # untruncated: what the images span
    if len(whole) > 1:
        raise DataError(where[0], where[1], None, f"{TEMPLATE}: a conversation with images must be one example, "
                        "and this chat template shows earlier turns differently from the last one")
    fitted = label_conversation(messages, ids, options.cutoff_len, options.mask, where)[0]
    if fitted.drop:
        return [fitted]
    if sum(t in marks for t in fitted.input_ids) < sum(t in marks for t in whole[0].input_ids):
        return [Encoded([], [], truncated=True, drop=IMAGE_CUT)]
    shown = max((before[n] for n in range(len(before)) if len(ids[3 * n]) < len(whole[0].input_ids)), default=0)
    fitted.labels = unsupervised(fitted.input_ids, list(fitted.labels), marks)  # type: ignore[arg-type]
    fitted.extra["images"] = sample["images"][:shown]
    return [fitted]


def processor_ids(processor: Any, text: str, images: list[Any]) -> list[int]:
    """The ids of a rendered text with each image's placeholder expanded into its tokens, as the processor's own
    apply_chat_template tokenizes it."""
    out = processor(text=[text], images=images or None, add_special_tokens=adds_special_tokens(processor, text))
    return list(out["input_ids"][0])


def encode_messages(
    tokenizer: Any, messages: list[Message], cutoff_len: int, where: tuple[str, int | str], mask: str = "assistant",
    tools: list[dict] | None = None, reasoning: str = "train",
) -> tuple[dict[str, Any] | None, bool]:
    """One conversation as {input_ids, labels}, or None when nothing supervised fits; and whether it was cut.
    (Under a template that shows history differently, the example of the last turn.)"""
    sample: Sample = {"messages": messages, **({"tools": tools} if tools else {})}
    encoded = encode_samples(tokenizer, [sample], [where], Encoding(cutoff_len, mask, reasoning=reasoning))[0][-1]
    if encoded.drop:
        return None, encoded.truncated
    return {"input_ids": encoded.input_ids, "labels": encoded.labels}, encoded.truncated


def _with_answer(sample: Sample, answer: Message) -> Sample:
    """One side of a preference pair as a conversation (with the record's tools)."""
    return {"messages": [*sample["messages"], answer], **({"tools": sample["tools"]} if sample.get("tools") else {})}


def encode_preferences(tokenizer: Any, samples: list[Sample], wheres: Wheres, options: Encoding) -> list[list[Encoded]]:
    """rm / dpo: each preference pair as one example, the chosen conversation as input_ids / labels, the rejected
    one as rejected_*.

    Only the final answer is supervised (mask `last`, whatever options.mask says): rm reads its score after
    it, dpo sums its log-probabilities. Each side is truncated on its own, keeping part of its answer.
    """
    last = replace(options, mask="last")
    sides = [encode_samples(tokenizer, [_with_answer(s, s[key]) for s in samples], wheres, last)
             for key in ("chosen", "rejected")]
    out = []
    for (chosen,), (rejected,) in zip(*sides):
        truncated = chosen.truncated or rejected.truncated
        if chosen.drop or rejected.drop:
            out.append([Encoded([], [], truncated, drop=chosen.drop or rejected.drop)])
        else:
            out.append([Encoded(chosen.input_ids, chosen.labels, truncated, extra={
                "rejected_input_ids": rejected.input_ids, "rejected_labels": rejected.labels})])
    return out


def encode_unpaired(tokenizer: Any, samples: list[Sample], wheres: Wheres, options: Encoding) -> list[list[Encoded]]:
    """kto: each conversation with its final answer supervised (mask `last`) and `desirable` (1 / 0) from the
    record's `label`; a preference pair gives two examples, its chosen answer desirable, its rejected one not."""
    conversations: list[Sample] = []
    judged: list[tuple[int, int | None]] = []  # (sample index, desirable)
    for i, (sample, where) in enumerate(zip(samples, wheres)):
        if "chosen" in sample:
            for key, side in (("chosen", 1), ("rejected", 0)):
                conversations.append(_with_answer(sample, sample[key]))
                judged.append((i, side))
            continue
        label = sample.get("desirable")
        flag: int | None = int(label) if isinstance(label, bool) or label in (0, 1) else None
        if flag is None and options.strict:
            shown = "it is missing" if label is None else f"got {label!r}"
            raise DataError(where[0], where[1], "label", f"stage kto needs true (a desirable answer) or false (an "
                            f"undesirable one), {shown}; map your field with `columns: {{label: YOUR_FIELD}}`")
        conversations.append(sample)
        judged.append((i, flag))
    encoded = encode_samples(tokenizer, conversations, [wheres[i] for i, _ in judged], replace(options, mask="last"))
    out: list[list[Encoded]] = [[] for _ in samples]
    for (example,), (i, desirable) in zip(encoded, judged):
        if desirable is None:
            example = Encoded([], [], drop=NO_JUDGEMENT)
        elif not example.drop:
            example.extra = {"desirable": desirable}
        out[i].append(example)
    return out


def encode_prompts(tokenizer: Any, samples: list[Sample], wheres: Wheres, options: Encoding) -> list[list[Encoded]]:
    """grpo: the conversation before its last answer, rendered with the generation prompt, as input_ids (nothing
    supervised: the answers are sampled); the last user message as `prompt` and the record's own answer as
    `reference`, for the reward functions. A prompt longer than cutoff_len is dropped."""
    conversations = [sft_messages(s) or [] for s in samples]
    prompts = [template_messages(c[:-1]) for c in conversations]
    render = renderer(tokenizer, conversations[0][:-1] if prompts else None, samples[0].get("tools") if samples else None)
    ids = tokenize(tokenizer, [render(p, True, s.get("tools")) for p, s in zip(prompts, samples)]) if prompts else []
    out = []
    for conversation, prompt, row in zip(conversations, prompts, ids):
        if len(row) > options.cutoff_len:
            out.append([Encoded([], [], drop=PROMPT_TOO_LONG)])
            continue
        last_user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
        out.append([Encoded(row, [IGNORE_INDEX] * len(row),
                            extra={"prompt": last_user, "reference": conversation[-1]["content"]})])
    return out


def class_names(labels: list[int | str]) -> list[str]:
    """Class names by index: 0..max for integer labels (or digit strings, as in GLUE TSVs), else sorted names."""
    if all(isinstance(x, int) or str(x).isdigit() for x in labels):
        return [str(i) for i in range(max(int(x) for x in labels) + 1)]
    return sorted({str(x) for x in labels})


def class_id(label: int | str, classes: list[str]) -> int | None:
    name = str(int(label)) if isinstance(label, int) or str(label).isdigit() else str(label)
    return classes.index(name) if name in classes else None


def encode_classification(tokenizer: Any, samples: list[Sample], wheres: Wheres,
                          options: Encoding) -> list[list[Encoded]]:
    """cls: text (+ text_pair) → input_ids and the class index (among options.classes) as `labels`.

    Encoders join a pair with their own template ([CLS] a [SEP] b [SEP], with token_type_ids);
    decoders, which have none, read the two texts on separate lines.
    """
    classes = options.classes or []
    pair_template = tokenizer.num_special_tokens_to_add(pair=True) > 0
    out = []
    for sample, where in zip(samples, wheres):
        label = class_id(sample["label"], classes)
        if label is None:
            if options.strict:
                raise DataError(where[0], where[1], "label", f"{sample['label']!r} is not one of the classes of the "
                                f"training data ({', '.join(classes)})")
            out.append([Encoded([], [], drop=UNKNOWN_CLASS)])
            continue
        text, pair = sample["text"], sample["text_pair"]
        if pair is not None and not pair_template:
            text, pair = f"{text}\n{pair}", None
        enc = tokenizer(text, pair)
        truncated = len(enc["input_ids"]) > options.cutoff_len
        if truncated:  # the tokenizer's own pair truncation (longest first) keeps both texts' special tokens
            enc = tokenizer(text, pair, truncation=True, max_length=options.cutoff_len)
        extra = {"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}
        out.append([Encoded(enc["input_ids"], label, truncated=truncated, extra=extra)])
    return out
