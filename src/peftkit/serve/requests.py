"""A request body read and checked into a Request (serve/service.py): every key's type and range, each bad one an
ApiError with OpenAI's 4xx status, code and param; what /v1/chat/completions and /v1/completions read differently
is one Reader each."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HttpRequest

from peftkit.data.formats import Message, normalize_tool_calls, normalize_tools
from peftkit.serve.service import Request

ROLES = ("system", "user", "assistant", "tool")
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far beyond any context window here; larger bodies get a 413 before parsing
MAX_N = 8  # answers per request
MAX_TOP_LOGPROBS = 20  # as OpenAI


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _content(m: Any, i: int) -> str | list[dict[str, str]]:
    """A message's text: a string, or OpenAI's list of {type: text, text} parts (null for an assistant's call); with
    {type: image_url, image_url: {url}} parts in a user message, template parts, each image as {type: image, image:
    url} (read by the service: data: URLs, or local paths under --image-root; remote URLs are refused here)."""
    content = m.get("content") if isinstance(m, dict) else None
    if content is None and isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls"):
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    if isinstance(content, list) and m.get("role") == "user":
        return _parts(content, i)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}] must be an object with string content (or a list of text parts; image "
                       "parts in user messages)", "invalid_messages", f"messages[{i}]")
    return content


def _parts(content: list[Any], i: int) -> list[dict[str, str]]:
    parts: list[dict[str, str]] = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        url = p.get("image_url") if kind == "image_url" else None
        url = url.get("url") if isinstance(url, dict) else url
        if kind == "text" and isinstance(p.get("text"), str):
            parts.append({"type": "text", "text": p["text"]})
        elif isinstance(url, str) and url:
            if url.startswith(("http://", "https://", "ftp://")):
                raise ApiError(400, f"messages[{i}].content[{j}]: remote image URLs are not fetched; send the image "
                               "as a data: URL (data:image/png;base64,...)", "invalid_image", f"messages[{i}].content")
            parts.append({"type": "image", "image": url})
        else:
            raise ApiError(400, f"messages[{i}].content[{j}] must be {{type: text, text}} or {{type: image_url, "
                           "image_url: {url}}", "invalid_messages", f"messages[{i}].content")
    return parts


def _int_in(body: dict, key: str, low: int, high: int, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{key}={value!r} must be an integer from {low} to {high}", f"invalid_{key}", key)
    return value


def _messages(messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "invalid_messages", "messages")
    clean: list[Message] = []
    for i, m in enumerate(messages):
        content = _content(m, i)
        if m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)}",
                           "invalid_role", f"messages[{i}].role")
        message: Message = {"role": m["role"], "content": content}
        if m.get("tool_calls") is not None:
            if m["role"] != "assistant":
                raise ApiError(400, f"messages[{i}]: only assistant messages have tool_calls", "invalid_messages",
                               f"messages[{i}].tool_calls")
            try:  # the calls the client got back, arguments as JSON strings: the template reads them as objects
                message["tool_calls"] = normalize_tool_calls(m["tool_calls"])
            except ValueError as e:
                raise ApiError(400, f"messages[{i}].tool_calls: {e}", "invalid_messages",
                               f"messages[{i}].tool_calls") from None
        if m["role"] == "assistant" and isinstance(m.get("reasoning_content"), str) and m["reasoning_content"]:
            message["reasoning_content"] = m["reasoning_content"]
        if m["role"] == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    message[key] = m[key]
        clean.append(message)
    return clean


def _prompt(body: dict) -> str:
    """A completions body's `prompt`: one non-empty string, continued as it is."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string", "invalid_prompt", "prompt")
    return prompt


def _tools(body: dict) -> tuple[list[dict] | None, str | None]:
    """(tools offered to the model, the function tool_choice forces) from `tools` and `tool_choice`:
    auto (the default with tools), none (the model sees no tools), or {"type": "function", "function": {"name"}}."""
    choice = body.get("tool_choice")
    if body.get("tools") is None:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", "invalid_tool_choice", "tool_choice")
        return None, None
    try:
        tools = normalize_tools(body["tools"])
    except ValueError as e:
        raise ApiError(400, str(e), "invalid_tools", "tools") from None
    names = [t["function"]["name"] for t in tools]
    if choice in (None, "auto"):
        return tools or None, None
    if choice == "none":
        return None, None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "tool_choice must be \"auto\", \"none\" or {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}} (\"required\" is not supported: name the function)", "invalid_tool_choice",
                       "tool_choice")
    if name not in names:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                       "invalid_tool_choice", "tool_choice")
    return tools, name


def _logprobs_asked(body: dict) -> int | None:
    """None: no logprobs; k: the chosen token's and the k most likely (OpenAI's logprobs + top_logprobs)."""
    if not isinstance(body.get("logprobs", False) or False, bool):
        raise ApiError(400, "logprobs must be true or false", "invalid_logprobs", "logprobs")
    top = _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_top_logprobs", "top_logprobs")
    return top if body.get("logprobs") else None


@dataclass(frozen=True)
class Reader:
    """The keys one API reads its own way; _parse calls each in its turn, so the first bad key is the one reported."""

    text: Callable[[dict], tuple[list[Message], str | None]]  # (messages, None) or ([], a raw prompt)
    logprobs: Callable[[dict], int | None]  # None: none asked; k: the chosen token's and the k most likely
    tools: Callable[[dict], tuple[list[dict] | None, str | None]]  # (tools offered, the function forced)


CHAT_READER = Reader(text=lambda body: (_messages(body.get("messages")), None), logprobs=_logprobs_asked, tools=_tools)
# a completions body: a `prompt` string, `logprobs: k`, no tools
COMPLETIONS_READER = Reader(text=lambda body: ([], _prompt(body)),
                            logprobs=lambda body: _int_in(body, "logprobs", 0, MAX_TOP_LOGPROBS, None),
                            tools=lambda body: (None, None))


def _parse(body: Any, models: dict[str, str | None], max_tokens_limit: int,
           reader: Reader = CHAT_READER) -> tuple[Request, bool, bool]:
    """(request, stream, include_usage) from a chat.completions body (or, with COMPLETIONS_READER, a completions
    body); every type is checked (ApiError 4xx)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_body")
    if not isinstance(body.get("model"), str) or body["model"] not in models:
        raise ApiError(404, f"The model {body.get('model')!r} does not exist; this server serves "
                       f"{', '.join(map(repr, models))}", "model_not_found", "model")
    clean, prompt = reader.text(body)
    n = _int_in(body, "n", 1, MAX_N, 1)
    seed = _int_in(body, "seed", -(2**63), 2**63 - 1, None)
    logprobs = reader.logprobs(body)
    fmt = body.get("response_format")
    if fmt is not None and fmt not in ({"type": "text"}, {"type": "json_object"}):
        raise ApiError(400, "response_format: {\"type\": \"text\"} or {\"type\": \"json_object\"} (json_schema is not "
                       "supported)", "invalid_response_format", "response_format")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = min(256, max_tokens_limit)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(400, f"{key}={max_tokens!r} must be an integer from 1 to {max_tokens_limit}",
                       "invalid_max_tokens", key)
    sampling = {}
    for name, default, high in (("temperature", 1.0, 2.0), ("top_p", 1.0, 1.0)):
        value = body.get(name)
        value = default if value is None else value
        if not _is_number(value) or not 0 <= value <= high:
            raise ApiError(400, f"{name}={value!r} must be a number from 0 to {high}", f"invalid_{name}", name)
        sampling[name] = float(value)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", "invalid_stop", "stop")
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream={stream!r} must be true or false", "invalid_stream", "stream")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "stream_options must be an object such as {\"include_usage\": true}",
                       "invalid_stream_options", "stream_options")
    tools, call = reader.tools(body)
    if tools and fmt == {"type": "json_object"}:
        raise ApiError(400, "response_format json_object cannot be combined with tools", "invalid_response_format",
                       "response_format")
    request = Request(clean, max_tokens, sampling["temperature"], sampling["top_p"], stop, seed=seed, n=n or 1,
                      logprobs=logprobs, adapter=models[body["model"]], json=fmt == {"type": "json_object"},
                      prompt=prompt, tools=tools, call=call)
    return request, stream, bool(options.get("include_usage", False))


async def _read_json(http: HttpRequest, max_body_bytes: int) -> Any:
    """The request body parsed; ApiError 413 past `max_body_bytes` (counted as it arrives: a chunked body has
    no content-length), 400 when it is not JSON."""
    declared = http.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than {max_body_bytes} bytes", "body_too_large")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large
    raw = bytearray()
    async for part in http.stream():
        raw += part
        if len(raw) > max_body_bytes:
            raise too_large
    try:
        return json.loads(bytes(raw))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", "invalid_json") from None
