"""JSON mode (`response_format: {"type": "json_object"}`): a character-level recogniser of JSON-object
prefixes, so the engine only picks tokens that keep the answer a prefix of some valid JSON object, and
the shortest text that closes what is open when the token budget runs out.

State is a stack of containers plus what the grammar expects next; `feed` returns a new state (or None
when the text cannot continue any JSON object), so candidates are tried without copying the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

_WS = " \t\n\r"
_LITERALS = ("true", "false", "null")
_NUMBER_CHARS = "0123456789+-.eE"


@dataclass(frozen=True)
class JsonState:
    stack: tuple[str, ...] = ()  # "{" or "[" for each open container
    expect: str = "start"  # start | value | key_or_end | key | colon | comma_or_end | value_or_end | done
    string: str | None = None  # inside a string: "key" or "value"; the text of an escape in progress after it
    escape: str = ""  # "" none, "\\" after a backslash, "u", "uX"... during \uXXXX
    token: str = ""  # a number or literal being read

    @property
    def complete(self) -> bool:
        return self.expect == "done"


def feed(state: JsonState | None, text: str) -> JsonState | None:
    """The state after `text`, or None if `text` cannot continue a JSON object from `state`."""
    for ch in text:
        if state is None:
            return None
        state = _step(state, ch)
    return state


def _after_value(state: JsonState) -> JsonState:
    if not state.stack:
        return replace(state, expect="done", token="")
    return replace(state, expect="comma_or_end", token="")


def _step(s: JsonState, ch: str) -> JsonState | None:  # noqa: C901 - one branch per grammar position
    if s.string is not None:
        return _in_string(s, ch)
    if s.token:  # a number or literal in progress: continue it, or end it and read ch afresh
        candidate = s.token + ch
        if s.token[0] in "tfn":
            if any(lit.startswith(candidate) for lit in _LITERALS):
                return replace(s, token=candidate)
            if s.token not in _LITERALS:
                return None
        elif ch in _NUMBER_CHARS:
            return replace(s, token=candidate) if _number_prefix(candidate) else None
        elif not _number_complete(s.token):
            return None
        return _step(_after_value(s), ch)
    if ch in _WS:
        return s
    if s.expect == "done":
        return None
    if s.expect == "start":
        return replace(s, stack=("{",), expect="key_or_end") if ch == "{" else None
    if s.expect in ("key_or_end", "key"):
        if ch == '"':
            return replace(s, string="key")
        if ch == "}" and s.expect == "key_or_end":
            return _after_value(replace(s, stack=s.stack[:-1]))
        return None
    if s.expect == "colon":
        return replace(s, expect="value") if ch == ":" else None
    if s.expect == "comma_or_end":
        if ch == ",":
            return replace(s, expect="key" if s.stack[-1] == "{" else "value")
        if ch == ("}" if s.stack[-1] == "{" else "]"):
            return _after_value(replace(s, stack=s.stack[:-1]))
        return None
    # value or value_or_end
    if ch == "]" and s.expect == "value_or_end":
        return _after_value(replace(s, stack=s.stack[:-1]))
    if ch == "{":
        return replace(s, stack=(*s.stack, "{"), expect="key_or_end")
    if ch == "[":
        return replace(s, stack=(*s.stack, "["), expect="value_or_end")
    if ch == '"':
        return replace(s, string="value")
    if ch in "tfn" or ch in "-0123456789":
        return replace(s, token=ch)
    return None


def _in_string(s: JsonState, ch: str) -> JsonState | None:
    if s.escape == "\\":
        if ch in '"\\/bfnrt':
            return replace(s, escape="")
        return replace(s, escape="u") if ch == "u" else None
    if s.escape.startswith("u"):
        if ch not in "0123456789abcdefABCDEF":
            return None
        return replace(s, escape="" if len(s.escape) == 4 else s.escape + ch)
    if ch == "\\":
        return replace(s, escape="\\")
    if ch == '"':
        if s.string == "key":
            return replace(s, string=None, expect="colon")
        return _after_value(replace(s, string=None))
    if ord(ch) < 0x20:  # control characters must be escaped
        return None
    return s


_NUMBER_PREFIX = re.compile(r"-?|-?(0|[1-9]\d*)(\.\d*)?|-?(0|[1-9]\d*)(\.\d+)?[eE][+-]?\d*")
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")


def _number_prefix(text: str) -> bool:
    """Whether `text` can still grow into a JSON number."""
    return _NUMBER_PREFIX.fullmatch(text) is not None


def _number_complete(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


def closing(s: JsonState) -> str:
    """The shortest text that makes the answer so far a complete JSON object."""
    out = ""
    if s.string is not None:
        out += {"\\": "n", "": ""}.get(s.escape, "0" * (5 - len(s.escape))) + '"'
        s = feed(s, out) or s
    if s.token:
        if s.token[0] in "tfn":
            lit = next(lit for lit in _LITERALS if lit.startswith(s.token))
            out += lit[len(s.token):]
        elif not _number_complete(s.token):
            fix = "0" if s.token[-1] in "-+.eE" else ""
            out += fix
        s = _after_value(replace(s, token=""))
    if s.expect == "colon":
        out += ":null"
    elif s.expect == "value" or (s.expect == "key" and s.stack and s.stack[-1] == "{"):
        out += "null" if s.expect == "value" else '"":null'
    for container in reversed(s.stack):
        out += "}" if container == "{" else "]"
    return out if s.expect != "start" else "{}"
