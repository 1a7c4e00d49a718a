"""Record formats: each a plain function from one record to a sample.

A sample is one of
  {"messages": [...]}                                   a conversation ending with the assistant
  {"messages": [...], "desirable": value}              the same, judged by the record's `label` (kto)
  {"messages": [...], "chosen": msg, "rejected": msg}   a preference pair after a prompt conversation
  {"text": str}                                         a document (continued pre-training)
  {"text": str, "text_pair": str | None, "label": ...}  a classification record
A user or system message with images has as content a list of parts ({"type": "text", "text"} and
{"type": "image"}, as image-text chat templates read them), and the sample lists the images in order as
"images" (data/images.py's references: absolute paths or data: URLs).
Messages are {"role", "content"} plus an optional "train": false, which is never supervised, and the
keys chat templates read for tools and reasoning (transformers' convention, so they render through
`apply_chat_template` unchanged): an assistant's `tool_calls` [{type: function, function: {name, arguments}}]
(arguments a dict) and `reasoning_content`; a tool result's `tool_call_id` / `name`. A conversation whose
record lists tools carries them as `"tools"` [{type: function, function: {name, description, parameters}}].
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NotRequired, TypedDict

from peftkit.data import images as image_refs
from peftkit.errors import DataError, kind_of


class ToolCall(TypedDict):
    """One call as chat templates read it: {"type": "function", "function": {"name", "arguments": dict}}."""

    type: str
    function: dict[str, Any]
    id: NotRequired[str]  # OpenAI's call id, kept for templates that render it


class Message(TypedDict):
    """One turn of a conversation; `train: false` keeps an assistant turn out of the labels."""

    role: str
    content: str | list[dict[str, str]]  # a list of text / image parts where a user or system message has images
    train: NotRequired[bool]
    tool_calls: NotRequired[list[ToolCall]]
    reasoning_content: NotRequired[str]
    tool_call_id: NotRequired[str]
    name: NotRequired[str]


# One of the four shapes in the module docstring; stage encoders know which they receive.
Sample = dict[str, Any]

DEFAULT_TAGS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call",
}
_ROLES = ("system", "user", "assistant", "tool")


class Where:
    """The file and record a conversion is working on, for its error messages."""

    def __init__(self, file: str, record: int | str) -> None:
        self.file, self.record = file, record

    def error(self, field: str | None, reason: str) -> DataError:
        return DataError(self.file, self.record, field, reason)


def _text(record: dict[str, Any], key: str, at: Where, required: bool) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        shown = "it is missing" if value is None else f"got {kind_of(value)}"
        raise at.error(key, f"must be a string, {shown}; map your field name with `columns: {{{key}: YOUR_FIELD}}`")
    return value


def _check_turns(messages: list[Message], field: str, at: Where, final_assistant: bool = True) -> None:
    """After an optional system message: user/tool and assistant turns alternate (the results of parallel
    tool calls, consecutive tool messages, count as one turn)."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    turn = 0
    for i, m in enumerate(messages[start:], start=start):
        if m["role"] == "tool" and i > start and messages[i - 1]["role"] == "tool":
            continue
        expected = ("user", "tool") if turn % 2 == 0 else ("assistant",)
        turn += 1
        if m["role"] not in expected:
            raise at.error(f"{field}[{i}]", f"out of role order: found {m['role']!r} where {' or '.join(expected)} "
                           "should be (an optional system message, then user and assistant turns alternating)")
    if final_assistant and (len(messages) == start or messages[-1]["role"] != "assistant"):
        raise at.error(field, "must end with the assistant's answer (nothing to learn otherwise)")
    if not final_assistant and messages[start:] and messages[-1]["role"] == "assistant":
        raise at.error(field, "the prompt of a preference pair must end with a user turn")


def _json(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON ({e.msg} at character {e.pos}): {value[:80]!r}") from None


def normalize_tool_calls(value: Any) -> list[ToolCall]:
    """Calls as templates read them, from OpenAI's [{type, function: {name, arguments: str}}], sharegpt's
    function_call value ({"name", "arguments"} as JSON text, or a list of them) or bare {name, arguments |
    parameters}; arguments become a dict. ValueError says what is wrong."""
    value = _json(value, "the tool call")
    calls = value if isinstance(value, list) else [value]
    out: list[ToolCall] = []
    for n, call in enumerate(calls):
        where = f"tool call {n}" if len(calls) > 1 else "the tool call"
        if not isinstance(call, dict):
            raise ValueError(f"{where} must be an object {{name, arguments}}, got {kind_of(call)}")
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"{where} needs a function name (a string): {{\"name\": ..., \"arguments\": {{...}}}}")
        arguments = _json(function.get("arguments", function.get("parameters", {})), f"{where}'s arguments")
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}'s arguments must be a JSON object, got {kind_of(arguments)}")
        normal: ToolCall = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            normal["id"] = call["id"]
        out.append(normal)
    if not out:
        raise ValueError("the tool call list is empty")
    return out


def normalize_tools(value: Any) -> list[dict[str, Any]]:
    """A record's or request's tools as OpenAI's [{type: function, function: {name, description, parameters}}],
    from that form, bare function schemas (glaive) or their JSON text. ValueError says what is wrong."""
    value = _json(value, "tools")
    if not isinstance(value, list):
        raise ValueError(f"tools must be a list of function schemas, got {kind_of(value)}")
    out = []
    for n, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{n}] must be a function schema {{name, description, parameters}} "
                             "(or {type: function, function: {...}})")
        out.append({"type": "function", "function": function})
    return out


def split_reasoning(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a content that opens with <think>...</think>; (None, content) otherwise."""
    head = content.lstrip()
    if head.startswith("<think>") and "</think>" in head:
        reasoning, _, answer = head[len("<think>"):].partition("</think>")
        return reasoning.strip(), answer.lstrip()
    return None, content


def _message(raw: Any, tags: dict[str, str], field: str, at: Where) -> Message:
    """One {from, value} or {role, content} message as {role, content[, train, tool_calls, ...]}."""
    if not isinstance(raw, dict):
        raise at.error(field, f"must be a message object, got {kind_of(raw)}")
    calls: Any = None
    if "role" in raw:  # OpenAI style
        role, content, calls = raw.get("role"), raw.get("content"), raw.get("tool_calls")
    else:
        role_names = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
                      tags["observation_tag"]: "tool", tags["function_tag"]: "assistant"}
        tag = raw.get(tags["role_tag"])
        if tag not in role_names:
            raise at.error(f"{field}.{tags['role_tag']}", f"unknown role {tag!r}; allowed: {', '.join(role_names)} "
                           "(other tag names: set data.tags, e.g. {user_tag: user, assistant_tag: assistant})")
        role, content = role_names[tag], raw.get(tags["content_tag"])
        if tag == tags["function_tag"]:  # the value is the call: {"name": ..., "arguments": {...}} (or a list)
            calls, content = content, ""
    if role not in _ROLES:
        raise at.error(f"{field}.role", f"unknown role {role!r}; allowed: {', '.join(_ROLES)}")
    if content is None and calls:
        content = ""  # OpenAI: an assistant message that only calls tools has content null
    if isinstance(content, list):
        content = _parts(content, role, field, at)
    if not isinstance(content, (str, list)):
        raise at.error(field, f"content must be a string, got {kind_of(content)}")
    message: Message = {"role": role, "content": content}
    _tool_fields(message, raw, calls, field, at)
    if role == "assistant":
        _reasoning(message, raw, field, at)
    if raw.get("train") is False:
        message["train"] = False
    return message


def _parts(raw: list[Any], role: str, field: str, at: Where) -> str | list[dict[str, str]]:
    """OpenAI content parts as template parts: text parts, and images ({"type": "image_url", "image_url": {"url"}}
    or {"type": "image", "path" | "url" | "image"}) as {"type": "image", "image": reference} until the sample
    collects them. Text parts alone become a string."""
    parts: list[dict[str, str]] = []
    for i, part in enumerate(raw):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
            continue
        if kind not in ("image", "image_url"):
            raise at.error(f"{field}.content[{i}]", "a content part must be {\"type\": \"text\", \"text\": ...}, "
                           "{\"type\": \"image_url\", \"image_url\": {\"url\": ...}} or {\"type\": \"image\", \"path\": ...}")
        url = part.get("image_url")
        ref = url.get("url") if isinstance(url, dict) else url if kind == "image_url" else next(
            (part[k] for k in ("path", "url", "image") if isinstance(part.get(k), str)), None)
        if not isinstance(ref, str) or not ref:
            raise at.error(f"{field}.content[{i}]", "an image part needs its image: a path, or a data: URL")
        if role not in ("user", "system"):
            raise at.error(f"{field}.content[{i}]", f"images go in user (or system) messages, not {role!r} ones")
        parts.append({"type": "image", "image": ref})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _placeholders(messages: list[Message], refs: list[Any], at: Where) -> None:
    """LLaMA-Factory's layout: the record's `images`, in order, where its messages say <image> (in front of the
    first user message when none does)."""
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise at.error("images", "must be a list of image paths (or data: URLs)")
    said = sum(m["content"].count(image_refs.PLACEHOLDER) for m in messages if isinstance(m["content"], str))
    if said == 0:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None or not isinstance(first["content"], str):
            raise at.error("images", "the record has images but no user message to show them in")
        first["content"] = image_refs.PLACEHOLDER * len(refs) + first["content"]
    elif said != len(refs):
        raise at.error("images", f"{len(refs)} image(s) listed but the messages have {said} "
                       f"{image_refs.PLACEHOLDER} placeholder(s); they must match")
    queue = list(refs)
    for i, m in enumerate(messages):
        content = m["content"]
        if not isinstance(content, str) or image_refs.PLACEHOLDER not in content:
            continue
        if m["role"] not in ("user", "system"):
            raise at.error(f"messages[{i}]", f"images go in user (or system) messages, not {m['role']!r} ones")
        parts: list[dict[str, str]] = []
        for n, piece in enumerate(content.split(image_refs.PLACEHOLDER)):
            if n:
                parts.append({"type": "image", "image": queue.pop(0)})
            if piece:
                parts.append({"type": "text", "text": piece})
        m["content"] = parts


def _collect_images(sample: Sample, at: Where) -> None:
    """The images of the sample's messages as sample["images"] (resolved against the dataset's folder, each checked
    readable), their parts left as {"type": "image"}."""
    from pathlib import Path

    base = Path(at.file).parent
    found: list[str] = []
    for i, m in enumerate(sample["messages"]):
        if not isinstance(m["content"], list):
            continue
        for j, part in enumerate(m["content"]):
            if part["type"] != "image":
                continue
            try:
                ref = image_refs.resolve(part.pop("image"), base)
                image_refs.load_image(ref)
            except ValueError as e:
                raise at.error(f"messages[{i}].content[{j}]", f"image {len(found)}: {e}") from None
            found.append(ref)
    if found:
        sample["images"] = found


def _tool_fields(message: Message, raw: dict[str, Any], calls: Any, field: str, at: Where) -> None:
    """An assistant message's calls; a tool message's tool_call_id / name."""
    if calls:
        if message["role"] != "assistant":
            raise at.error(f"{field}.tool_calls", f"only assistant messages call tools, not {message['role']!r} ones")
        try:
            message["tool_calls"] = normalize_tool_calls(calls)
        except ValueError as e:
            raise at.error(f"{field}.tool_calls" if "role" in raw else field, str(e)) from None
    if message["role"] == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(raw.get(key), str):
                message[key] = raw[key]


def _reasoning(message: Message, raw: dict[str, Any], field: str, at: Where) -> None:
    """An assistant message's `reasoning_content` (or `reasoning`), or the <think>...</think> its content opens with."""
    reasoning = raw.get("reasoning_content", raw.get("reasoning"))
    if reasoning is None and isinstance(message["content"], str):  # (an assistant's content is text: _parts)
        reasoning, message["content"] = split_reasoning(message["content"])
    elif not isinstance(reasoning, str):
        raise at.error(f"{field}.reasoning_content", f"must be a string, got {kind_of(reasoning)}")
    if reasoning:
        message["reasoning_content"] = reasoning


def _conversation(record: dict[str, Any], at: Where, tags: dict[str, str] | None) -> Sample:
    """{"messages": [...]} plus {"tools": [...]} when the record lists the tools its conversation may call."""
    tags = {**DEFAULT_TAGS, **(tags or {})}
    field = "messages" if "messages" in record else "conversations"
    raw = record.get(field)
    if not isinstance(raw, list):
        raise at.error("conversations", "must be a list of {from, value} (or `messages` of {role, content}); "
                       "map your field with `columns: {conversations: YOUR_FIELD}`")
    messages = [_message(m, tags, f"{field}[{i}]", at) for i, m in enumerate(raw)]
    system = record.get("system")
    if isinstance(system, str) and system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    sample: Sample = {"messages": messages}
    if record.get("images"):
        _placeholders(messages, record["images"], at)
    _collect_images(sample, at)
    if record.get("tools"):  # rendered by the chat template (apply_chat_template's `tools`), as at inference
        try:
            sample["tools"] = normalize_tools(record["tools"])
        except ValueError as e:
            raise at.error("tools", str(e)) from None
    return sample


def alpaca(record: dict[str, Any], at: Where, tags: dict[str, str] | None = None) -> Sample:
    """instruction (+ input on a new line) → output, after the optional system and history turns."""
    messages = _alpaca_prompt(record, at)
    messages.append({"role": "assistant", "content": _text(record, "output", at, required=True)})
    sample: Sample = {"messages": messages}
    if record.get("images"):
        _placeholders(messages, record["images"], at)
        _collect_images(sample, at)
    return _judged(sample, record)


def _judged(sample: Sample, record: dict[str, Any]) -> Sample:
    """A conversation with the record's `label` as `desirable` (kto's unpaired feedback; checked by its encoder)."""
    if "label" in record:
        sample["desirable"] = record["label"]
    return sample


def _alpaca_prompt(record: dict[str, Any], at: Where) -> list[Message]:
    messages: list[Message] = []
    system = _text(record, "system", at, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise at.error("history", "must be a list of [query, answer] pairs")
    for turn, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise at.error(f"history[{turn}]", "must be a [query, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(record, "instruction", at, required=True)
    extra = _text(record, "input", at, required=False)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    if not prompt.strip():
        raise at.error("instruction", "is empty")
    messages.append({"role": "user", "content": prompt})
    return messages


def sharegpt(record: dict[str, Any], at: Where, tags: dict[str, str] | None = None) -> Sample:
    """`conversations` of {from, value} (role tags configurable) or OpenAI `messages` of {role, content}."""
    sample = _conversation(record, at, tags)
    _check_turns(sample["messages"], "conversations" if "conversations" in record else "messages", at)
    return _judged(sample, record)


def preference(record: dict[str, Any], at: Where, tags: dict[str, str] | None = None) -> Sample:
    """A prompt (conversation, alpaca fields or a `prompt` string) with a chosen and a rejected answer."""
    if "conversations" in record or "messages" in record:
        sample = _conversation(record, at, tags)
        _check_turns(sample["messages"], "conversations" if "conversations" in record else "messages", at,
                     final_assistant=False)
    elif "instruction" in record:
        sample = {"messages": _alpaca_prompt(record, at)}
    else:
        sample = {"messages": [{"role": "user", "content": _text(record, "prompt", at, required=True)}]}
    for key in ("chosen", "rejected"):
        value = record.get(key)
        if isinstance(value, list) and value:  # TRL's conversational style: the answer is the last message
            value = value[-1]
        answer = {"role": "assistant", "content": value} if isinstance(value, str) else _message(
            value, {**DEFAULT_TAGS, **(tags or {})}, key, at)
        if answer["role"] != "assistant" or not (str(answer["content"]).strip() or answer.get("tool_calls")):
            raise at.error(key, "must be a non-empty assistant answer (a string, or a gpt / assistant message)")
        sample[key] = answer
    return sample


def text(record: dict[str, Any], at: Where, tags: dict[str, str] | None = None) -> Sample:
    """A document for continued pre-training."""
    value = _text(record, "text", at, required=True)
    if not value.strip():
        raise at.error("text", "is empty")
    return {"text": value}


def pairs(record: dict[str, Any], at: Where, tags: dict[str, str] | None = None) -> Sample:
    """text, optional text_pair, and label (an integer class or a class name)."""
    label = record.get("label")
    if label is None or isinstance(label, (bool, float)) or not isinstance(label, (int, str)):
        raise at.error("label", f"must be an integer class or a class name, got {label!r}; "
                       "map your field with `columns: {label: YOUR_FIELD}`")
    pair = record.get("text_pair")
    return {"text": _text(record, "text", at, required=True),
            "text_pair": _text(record, "text_pair", at, required=False) if pair is not None else None,
            "label": label}


FORMATS: dict[str, Callable[..., Sample]] = {
    "alpaca": alpaca,
    "sharegpt": sharegpt,
    "messages": sharegpt,
    "preference": preference,
    "text": text,
    "pairs": pairs,
}


def rename_columns(record: dict[str, Any], columns: dict[str, str] | None) -> dict[str, Any]:
    """The record with the file's field names replaced by peftkit's (`columns: {peftkit_name: file_name}`)."""
    if not columns:
        return record
    out = dict(record)
    for ours, theirs in columns.items():
        if theirs in record:
            out[ours] = record[theirs]
    return out


def with_system(sample: Sample, system: str | None) -> Sample:
    """The sample with `data.system` as its first message when it has a conversation but no system message."""
    messages = sample.get("messages")
    if system is None or not messages or messages[0]["role"] == "system":
        return sample
    return {**sample, "messages": [{"role": "system", "content": system}, *messages]}


def sft_messages(sample: Sample) -> list[Message] | None:
    """The conversation supervised fine-tuning learns from a sample; None for a plain document.

    Preference pairs train on the chosen answer; classification pairs on the label as the answer.
    """
    if "chosen" in sample:
        return [*sample["messages"], sample["chosen"]]
    if "label" in sample:
        prompt = sample["text"] if sample["text_pair"] is None else f"{sample['text']}\n{sample['text_pair']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(sample["label"])}]
    return sample.get("messages")
