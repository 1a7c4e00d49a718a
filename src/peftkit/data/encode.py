"""Samples → input_ids and labels, through the tokenizer's chat template. Labels are made only here.

The labels of assistant turn k are exactly the tokens between
render(messages[:k], add_generation_prompt=True) and render(messages[:k+1]), the record's tools passed
as `apply_chat_template(tools=...)` passes them. If the first is not a token prefix of the second, the
record fails loudly rather than being mislabelled. A template that shows earlier turns differently from
the last one (as reasoning templates that drop past thinking do) is rendered turn by turn: when the
prompt of turn k does not continue the text so far, turn k starts a new example whose prompt is the
history exactly as the template shows it at inference. Every text of a batch is tokenized in one call of
the fast tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftkit.constants import IGNORE_INDEX
from peftkit.data.formats import Message, Sample, sft_messages
from peftkit.errors import ConfigError, DataError, PeftkitError

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
_TEMPLATE_KEYS = ("role", "content", "tool_calls", "reasoning_content", "tool_call_id", "name")


def template_messages(messages: list[Message], reasoning: str = "train") -> list[dict[str, Any]]:
    """The messages as the chat template reads them (peftkit's `train` flag removed; reasoning removed when
    data.reasoning is drop; reasoning also as `thinking`, as transformers aliases it for templates)."""
    out = []
    for m in messages:
        plain: dict[str, Any] = {k: m[k] for k in _TEMPLATE_KEYS if k in m}  # type: ignore[literal-required]
        if reasoning == "drop":
            plain.pop("reasoning_content", None)
        elif "reasoning_content" in plain:
            plain = {"thinking": plain["reasoning_content"], **plain}
        out.append(plain)
    return out


def _renderer(tokenizer: Any, first: list[Message] | None = None, tools: list[dict] | None = None) -> Any:
    """render(messages, add_generation_prompt, tools=None) as apply_chat_template renders, without its per-call
    overhead.

    The template is the one transformers compiles (same Jinja environment and globals) with the same
    variables (the special tokens, tools, documents), through a private transformers function. So that a
    transformers release that renders differently cannot pass unnoticed, the first conversation of each
    template is rendered both ways once per process, and a difference raises.
    """
    def public(messages: list[dict], gen: bool, tools: list[dict] | None = None) -> str:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tokenizer.chat_template)
        special = dict(tokenizer.special_tokens_map)
    except (ImportError, AttributeError, TypeError):  # another transformers: take the public path
        return public

    def fast(messages: list[dict], gen: bool, tools: list[dict] | None = None) -> str:
        return template.render(messages=messages, tools=tools, documents=None, add_generation_prompt=gen, **special)

    if first is not None and tokenizer.chat_template not in _VERIFIED_TEMPLATES:
        plain = template_messages(first)
        if fast(plain, False, tools) != public(plain, False, tools):
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


def render_prompt(tokenizer: Any, messages: list[Message], tools: list[dict] | None = None,
                  call: str | None = None) -> list[int]:
    """Token ids of the conversation so far plus the assistant's generation prompt, rendered and tokenized
    exactly as training renders a prompt (eval, chat, serve and export's check all use this).

    `call` names a tool the answer must call: the prompt then ends with the template's own opening of that
    call, up to where its arguments start (what a forced tool_choice generates is the arguments object)."""
    plain = template_messages(messages)
    render = _renderer(tokenizer, messages or None, tools)
    check_template_shows(tokenizer.chat_template, render, [{"messages": messages, "tools": tools}])
    text = render(plain, True, tools)
    if call is not None:
        probe = {"type": "function", "function": {"name": call, "arguments": {"peftkit_probe_arg": 1}}}
        full = render([*plain, {"role": "assistant", "content": "", "tool_calls": [probe]}], False, tools)
        start = full.find('{"peftkit_probe_arg": 1}', len(text))
        if not full.startswith(text) or start < 0:
            raise ConfigError(["data.template: the chat template does not write a tool call's arguments as a JSON "
                               "object after its generation prompt, so a named tool_choice cannot be forced"])
        text = full[:start]
    return _tokenize(tokenizer, [text])[0]


_SENTINEL = "\u2063peftkit-answer\u2063"  # marks where an answer's content starts in a rendering


def _texts(render: Any, messages: list[Message], tools: list[dict] | None, reasoning: str,
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
    """Prompt / response segments from the token renderings of `_texts`, with supervision from `mask`: one list
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


def _conversation(messages: list[Message], renders: list[list[int]], cutoff_len: int, mask: str,
                  where: tuple[str, int | str]) -> list[Encoded]:
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


def _document(ids: list[int], cutoff_len: int) -> list[Encoded]:
    """A document cut into blocks of cutoff_len, every token supervised: nothing is thrown away."""
    blocks = [ids[i : i + cutoff_len] for i in range(0, len(ids), cutoff_len)]
    return [Encoded(b, list(b)) if len(b) > 1 else Encoded([], [], drop=TOO_SHORT) for b in blocks]


_PROBE_TOOL = {"type": "function", "function": {"name": "peftkit_probe_tool", "description": "",
                                             "parameters": {"type": "object", "properties": {}}}}
_PROBE_CALL = {"type": "function", "function": {"name": "peftkit_probe_tool", "arguments": {"peftkit_probe_arg": 1}}}
_PROBES: dict[str, tuple[list[dict], str, str]] = {  # what a record has: (a conversation showing it, what must show)
    "tools": ([{"role": "user", "content": "q"}], "peftkit_probe_tool", "the record's `tools`"),
    "tool_calls": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}],
                   "peftkit_probe_arg", "assistant `tool_calls` (sharegpt function_call turns)"),
    "tool": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
              {"role": "tool", "content": "peftkit_probe_result", "name": "peftkit_probe_tool"}],
             "peftkit_probe_result", "tool results (sharegpt observation turns)"),
    "reasoning_content": ([{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a", "reasoning_content": "peftkit_probe_thought"}],
                          "peftkit_probe_thought", "assistant reasoning (`reasoning_content` or <think>...</think>)"),
}
_SHOWN: dict[tuple[str, str], str] = {}  # (template, feature) -> "" when shown, else why not


def _features(sample: Sample) -> set[str]:
    found = {"tools"} if sample.get("tools") else set()
    for m in sample.get("messages") or []:
        found |= {k for k in ("tool_calls", "reasoning_content") if m.get(k)}
        if m["role"] == "tool":
            found.add("tool")
    return found


def check_template_shows(template: str, render: Any, samples: list[Sample], reasoning: str = "train") -> None:
    """ConfigError when samples have tools, tool calls, tool results or reasoning that the chat template would
    silently leave out of the text (checked once per template and feature, on a probe conversation)."""
    needed = set().union(*(_features(s) for s in samples)) if samples else set()
    if reasoning == "drop":
        needed.discard("reasoning_content")
    for feature in sorted(needed):
        if (template, feature) not in _SHOWN:
            messages, mark, _ = _PROBES[feature]
            try:
                text = render(messages, False, [_PROBE_TOOL])
                _SHOWN[template, feature] = "" if mark in text else "it renders without them"
            except Exception as e:  # noqa: BLE001 - a template that raises on them cannot show them
                _SHOWN[template, feature] = f"rendering raises {type(e).__name__}: {e}"
        if _SHOWN[template, feature]:
            raise ConfigError([
                f"data.template: the chat template cannot show {_PROBES[feature][2]} ({_SHOWN[template, feature]}), "
                "so the model would never see them; use data.template: chatml or llama3 (peftkit's templates with tools "
                "and reasoning) or a .jinja file that renders them"
                + (", or data.reasoning: drop" if feature == "reasoning_content" else "")
            ])


def encode_samples(
    tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]], cutoff_len: int,
    mask: str = "assistant", strict: bool = True, reasoning: str = "train",
) -> list[list[Encoded]]:
    """The examples of each sample (one, several blocks for a long document, or one per turn under a template
    that shows history differently; dropped ones carry a reason).

    strict=False turns a template error into a dropped record instead of raising it.
    """
    conversations = [sft_messages(s) for s in samples]
    first = next(((m, s.get("tools")) for m, s in zip(conversations, samples) if m is not None), None)
    render = _renderer(tokenizer, *first) if first is not None else None
    if render is not None:
        check_template_shows(tokenizer.chat_template, render, samples, reasoning)
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    failed: dict[int, DataError] = {}
    for n, (sample, messages) in enumerate(zip(samples, conversations)):
        start = len(texts)
        if messages is None:
            texts.append(sample["text"])
        else:
            try:
                texts += _texts(render, messages, sample.get("tools"), reasoning, wheres[n])
            except DataError as e:
                failed[n] = e
        spans.append((start, len(texts)))
    ids = _tokenize(tokenizer, texts) if texts else []
    out: list[list[Encoded]] = []
    for n, (messages, (start, end), where) in enumerate(zip(conversations, spans, wheres)):
        if messages is None:
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            out.append(_document(ids[start] + eos, cutoff_len))
            continue
        try:
            if n in failed:
                raise failed[n]
            out.append(_conversation(messages, ids[start:end], cutoff_len, mask, where))
        except DataError:
            if strict:
                raise
            out.append([Encoded([], [], drop=TEMPLATE)])
    return out


def encode_messages(
    tokenizer: Any, messages: list[Message], cutoff_len: int, where: tuple[str, int | str], mask: str = "assistant",
    tools: list[dict] | None = None, reasoning: str = "train",
) -> tuple[dict[str, Any] | None, bool]:
    """One conversation as {input_ids, labels}, or None when nothing supervised fits; and whether it was cut.
    (Under a template that shows history differently, the example of the last turn.)"""
    sample: Sample = {"messages": messages, **({"tools": tools} if tools else {})}
    encoded = encode_samples(tokenizer, [sample], [where], cutoff_len, mask, reasoning=reasoning)[0][-1]
    if encoded.drop:
        return None, encoded.truncated
    return {"input_ids": encoded.input_ids, "labels": encoded.labels}, encoded.truncated


def _with_answer(sample: Sample, answer: Message) -> Sample:
    """One side of a preference pair as a conversation (with the record's tools)."""
    return {"messages": [*sample["messages"], answer], **({"tools": sample["tools"]} if sample.get("tools") else {})}


def encode_preferences(
    tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]], cutoff_len: int, strict: bool = True,
    reasoning: str = "train",
) -> list[Encoded]:
    """Preference pairs: the chosen conversation as input_ids / labels, the rejected one as rejected_*.

    Only the final answer is supervised (mask `last`): rm reads its score after it, dpo sums its
    log-probabilities. Each side is truncated on its own, keeping part of its answer.
    """
    sides = [encode_samples(tokenizer, [_with_answer(s, s[key]) for s in samples], wheres,
                            cutoff_len, "last", strict, reasoning) for key in ("chosen", "rejected")]
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
    reasoning: str = "train",
) -> list[list[Encoded]]:
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
        if flag is None and strict:
            shown = "it is missing" if label is None else f"got {label!r}"
            raise DataError(where[0], where[1], "label", f"stage kto needs true (a desirable answer) or false (an "
                            f"undesirable one), {shown}; map your field with `columns: {{label: YOUR_FIELD}}`")
        conversations.append(sample)
        judged.append((i, flag))
    encoded = encode_samples(tokenizer, conversations, [wheres[i] for i, _ in judged], cutoff_len, "last", strict,
                             reasoning)
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
    prompts = [template_messages(c[:-1]) for c in conversations]
    render = _renderer(tokenizer, conversations[0][:-1] if prompts else None, samples[0].get("tools") if samples else None)
    ids = _tokenize(tokenizer, [render(p, True, s.get("tools")) for p, s in zip(prompts, samples)]) if prompts else []
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
    return encode_samples(tokenizer, samples, wheres, options.cutoff_len, options.mask, options.strict,
                          options.reasoning)


def preference_examples(tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]],
                        options: Any) -> list[list[Encoded]]:
    return [[e] for e in encode_preferences(tokenizer, samples, wheres, options.cutoff_len, options.strict,
                                               options.reasoning)]


def unpaired_examples(tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]],
                      options: Any) -> list[list[Encoded]]:
    return encode_unpaired(tokenizer, samples, wheres, options.cutoff_len, options.strict, options.reasoning)


def prompt_examples(tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]],
                    options: Any) -> list[list[Encoded]]:
    return [[e] for e in encode_prompts(tokenizer, samples, options.cutoff_len)]


def class_examples(tokenizer: Any, samples: list[Sample], wheres: list[tuple[str, int | str]],
                   options: Any) -> list[list[Encoded]]:
    return [[e] for e in encode_classification(tokenizer, samples, wheres, options.cutoff_len,
                                               options.classes or [], options.strict)]
