"""Record formats: each a plain function from one record to a list of chat messages."""

from __future__ import annotations

from typing import Any, Callable

from peftkit.errors import DataError

Message = dict[str, str]


def _text(record: dict[str, Any], key: str, file: str, index: int, required: bool) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        shown = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(file, index, key, f"must be a string, got {shown}")
    return value


def alpaca(record: dict[str, Any], file: str, index: int) -> list[Message]:
    """instruction (+ input on a new line) → output, after the optional system and history turns."""
    messages: list[Message] = []
    system = _text(record, "system", file, index, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(file, index, "history", "must be a list of [query, answer] pairs")
    for turn, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(file, index, "history", f"turn {turn} must be a [query, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(record, "instruction", file, index, required=True)
    extra = _text(record, "input", file, index, required=False)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    if not prompt.strip():
        raise DataError(file, index, "instruction", "is empty")
    output = _text(record, "output", file, index, required=True)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


def openai_messages(record: dict[str, Any], file: str, index: int) -> list[Message]:
    """OpenAI-style {"messages": [{"role", "content"}, ...]} ending with an assistant turn."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(file, index, "messages", "must be a non-empty list of {role, content}")
    for turn, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise DataError(file, index, "messages", f"message {turn} needs role system/user/assistant and string content")
    if messages[-1]["role"] != "assistant":
        raise DataError(file, index, "messages", "the last message must be the assistant's answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


FORMATS: dict[str, Callable[[dict[str, Any], str, int], list[Message]]] = {
    "alpaca": alpaca,
    "messages": openai_messages,
}
