"""Tool calls and reasoning read back out of generated text, in the formats chat templates write them.

Templates put a call either inside <tool_call>...</tool_call> tags (Hermes / Qwen / peftkit's chatml) or
as bare {"name", "arguments" | "parameters"} JSON (Llama 3.1, peftkit's llama3), and reasoning inside
<think>...</think> before the answer. Text that does not parse as calls stays content: a malformed call
is the model's answer, never an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

THINK, END_THINK = "<think>", "</think>"
CALL_TAG = "<tool_call>"
PYTHON_TAG = "<|python_tag|>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class Call:
    name: str
    arguments: dict[str, Any]


@dataclass
class Parsed:
    """An answer split into reasoning, content and tool calls (None: the answer calls nothing)."""

    content: str
    reasoning: str | None = None
    calls: list[Call] | None = None


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, rest): text inside a leading <think>...</think>, or before a </think> whose <think> the
    generation prompt already wrote; an unclosed <think> is all reasoning."""
    head = text.lstrip()
    if head.startswith(THINK):
        inside, closed, rest = head[len(THINK):].partition(END_THINK)
        return inside.strip(), rest.lstrip() if closed else ""
    if END_THINK in text:
        inside, _, rest = text.partition(END_THINK)
        return inside.strip(), rest.lstrip()
    return None, text


def _call(value: Any) -> Call | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return Call(value["name"], arguments) if isinstance(arguments, dict) else None


def _json_values(text: str) -> list[Any] | None:
    """The JSON values `text` is made of (separated by whitespace, ';' or ','), or None."""
    decoder, i = json.JSONDecoder(), 0
    values: list[Any] = []
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values += value if isinstance(value, list) else [value]


def _calls(values: list[Any] | None) -> list[Call] | None:
    """Every value a call, or None."""
    calls = [_call(v) for v in values or [None]]
    good = [c for c in calls if c is not None]
    return good if len(good) == len(calls) else None


def parse_calls(text: str) -> tuple[str, list[Call] | None]:
    """(content, calls) of an answer; calls None when it calls nothing or its calls do not parse."""
    if CALL_TAG in text:
        calls: list[Call] = []
        for block in _BLOCK.findall(text):
            parsed = _calls(_json_values(block))
            if parsed is None:
                return text, None
            calls += parsed
        return _BLOCK.sub("", text).strip(), calls
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if body[:1] in ("{", "["):
        parsed = _calls(_json_values(body))
        if parsed is not None:
            return "", parsed
    return text, None


def parse_output(text: str, tools: bool) -> Parsed:
    """Reasoning, content and (`tools`: the request offered some) calls of a generated answer."""
    reasoning, rest = split_reasoning(text)
    if not tools:
        return Parsed(rest, reasoning)
    content, calls = parse_calls(rest)
    return Parsed(content, reasoning, calls)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (it may be the start of one)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class DeltaSplitter:
    """Streamed text as reasoning and content deltas, holding back whatever may still turn out to be a
    <think> tag or a tool call; `finish` parses the whole answer and says what is left to send."""

    def __init__(self, tools: bool) -> None:
        self.tools, self.text = tools, ""
        self.reasoning, self.content = "", ""  # what has been sent

    def _safe(self) -> tuple[str, str]:
        """The reasoning and content that can be sent now (each a prefix of what the whole answer gives)."""
        head = self.text.lstrip()
        if not head or THINK.startswith(head):
            return "", ""
        if head.startswith(THINK):
            inside, closed, rest = head[len(THINK):].partition(END_THINK)
            if not closed:
                return inside[: len(inside) - _partial_suffix(inside, END_THINK)].strip(), ""
            reasoning, content = inside.strip(), rest.lstrip()
        else:
            reasoning, content = "", self.text
        if self.tools:
            body = content.lstrip()
            if not body or body[0] in "{[" or PYTHON_TAG.startswith(body[:len(PYTHON_TAG)]) \
                    or CALL_TAG.startswith(body[:len(CALL_TAG)]):
                return reasoning, ""  # may be a call: wait for the end
            content = content.split(CALL_TAG, 1)[0]
            content = content[: len(content) - _partial_suffix(content, CALL_TAG)]
        return reasoning, content.rstrip()  # trailing space may precede a call: sent with what follows

    def _deltas(self, reasoning: str, content: str) -> list[dict[str, str]]:
        out = []
        if reasoning.startswith(self.reasoning) and len(reasoning) > len(self.reasoning):
            out.append({"reasoning_content": reasoning[len(self.reasoning):]})
            self.reasoning = reasoning
        if content.startswith(self.content) and len(content) > len(self.content):
            out.append({"content": content[len(self.content):]})
            self.content = content
        return out

    def feed(self, piece: str) -> list[dict[str, str]]:
        self.text += piece
        return self._deltas(*self._safe())

    def finish(self) -> tuple[list[dict[str, str]], list[Call] | None]:
        """The deltas still to send and the calls of the whole answer (None: it calls nothing)."""
        parsed = parse_output(self.text, self.tools)
        return self._deltas(parsed.reasoning or "", parsed.content), parsed.calls
