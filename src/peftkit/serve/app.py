"""An OpenAI-compatible HTTP API over one model: /v1/models and /v1/chat/completions (whole or streamed).

Every bad request gets a 4xx with an OpenAI-style error body; unexpected failures get a 500 body.
The server never crashes on input.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from peftkit.data.formats import Message
from peftkit.serve.engine import Engine, Outcome, Request

ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error_response(status: int, message: str, code: str, param: str | None = None) -> Any:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


MAX_BODY_BYTES = 1 << 20  # 1 MiB: far beyond any context window here; larger bodies get a 413 before parsing


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _content(m: Any, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {type: text, text} parts."""
    content = m.get("content") if isinstance(m, dict) else None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}] must be an object with string content (or a list of text parts)",
                       "invalid_messages", f"messages[{i}]")
    return content


def _parse(body: Any, model_name: str, max_tokens_limit: int) -> tuple[Request, bool, bool]:
    """(request, stream, include_usage) from a chat.completions body; every type is checked (ApiError 4xx)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_body")
    if body.get("model") != model_name:
        raise ApiError(404, f"The model {body.get('model')!r} does not exist; this server serves {model_name!r}",
                       "model_not_found", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "invalid_messages", "messages")
    clean: list[Message] = []
    for i, m in enumerate(messages):
        content = _content(m, i)
        if m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)}",
                           "invalid_role", f"messages[{i}].role")
        clean.append({"role": m["role"], "content": content})
    n = body.get("n")
    if n is not None and (not _is_number(n) or n != 1):
        raise ApiError(400, "only n=1 is supported", "invalid_n", "n")
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
    request = Request(clean, max_tokens, sampling["temperature"], sampling["top_p"], stop)
    return request, stream, bool(options.get("include_usage", False))


class _Guard:
    """Auth, and a 500 body for anything unexpected. Plain ASGI rather than @app.middleware: Starlette's
    BaseHTTPMiddleware hides a client's disconnect from `request.is_disconnected()`."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None:
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(header, f"Bearer {self.api_key}".encode()):
                return await _error_response(401, "Incorrect API key provided", "invalid_api_key")(scope, receive, send)
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 - the server answers, it does not die
            if not started:
                await _error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_error")(scope, receive, send)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_tokens_limit: int = 1024,
               max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The FastAPI app; `api_key` set means every request needs `Authorization: Bearer <key>`."""
    app = FastAPI(title="peftkit", docs_url=None, redoc_url=None)
    # Requests wait their turn here, on the event loop, not in worker threads: a thread blocked on the
    # engine's lock for each queued request would exhaust the pool the running one needs for its next step.
    turn = asyncio.Lock()

    app.add_middleware(_Guard, api_key=api_key)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "peftkit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            return _error_response(413, f"the request body is larger than {max_body_bytes} bytes", "body_too_large")
        raw = bytearray()
        async for part in http.stream():  # counted as it arrives: a chunked body has no content-length
            raw += part
            if len(raw) > max_body_bytes:
                return _error_response(413, f"the request body is larger than {max_body_bytes} bytes", "body_too_large")
        try:
            body = json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return _error_response(400, "the request body is not valid JSON", "invalid_json")
        try:
            request, stream, include_usage = _parse(body, model_name, max_tokens_limit)
            ids = await asyncio.to_thread(engine.prompt_ids, request.messages)  # off the event loop
            prompt_len = len(ids)
            if prompt_len + request.max_tokens > engine.context_window:
                raise ApiError(400, f"This model's context window is {engine.context_window} tokens; the prompt has "
                               f"{prompt_len} and max_tokens asks for {request.max_tokens} more",
                               "context_length_exceeded", "messages")
        except ApiError as e:
            return _error_response(e.status, e.message, e.code, e.param)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        cancel = threading.Event()  # set when the client goes away: generation stops at the next token
        if stream:
            events = _sse(engine, request, ids, ident, created, model_name, include_usage, cancel)
            return StreamingResponse(_until_disconnect(events, cancel, turn), media_type="text/event-stream")
        outcome = Outcome()
        async with turn:
            work = asyncio.ensure_future(asyncio.to_thread(lambda: "".join(engine.stream(request, ids, outcome, cancel))))
            while not work.done():
                await asyncio.wait([work], timeout=0.25)
                if not work.done() and await http.is_disconnected():
                    cancel.set()
        text = work.result()
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": outcome.finish_reason}],
            "usage": _usage(outcome),
        }

    return app


def _usage(outcome: Outcome) -> dict[str, int]:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


async def _until_disconnect(events: Generator[str, None, None], cancel: threading.Event,
                            turn: asyncio.Lock) -> AsyncIterator[str]:
    """The sync event generator, each step in a worker thread, once it is this request's turn; however the
    response ends (a client that disconnects cancels this generator), `cancel` is set so the generation
    behind it stops too."""
    stepping = threading.Lock()  # held while a worker thread runs the generator one step

    def step() -> str | None:
        with stepping:
            return next(events, None)

    def close() -> None:  # after any step in flight: closing releases the engine's lock now, not at GC
        with stepping:
            events.close()

    try:
        async with turn:
            while True:
                event = await asyncio.to_thread(step)
                if event is None:
                    return
                yield event
    finally:
        cancel.set()
        threading.Thread(target=close, daemon=True).start()


def _sse(engine: Engine, request: Request, ids: list[int], ident: str, created: int, model_name: str,
         include_usage: bool, cancel: threading.Event) -> Generator[str, None, None]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        data: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    outcome = Outcome()
    yield chunk({"role": "assistant", "content": ""})
    try:
        for text in engine.stream(request, ids, outcome, cancel):
            yield chunk({"content": text})
    except Exception as e:  # noqa: BLE001 - report in-band; the response has already started
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        return
    yield chunk({}, outcome.finish_reason, _usage(outcome) if include_usage else None)
    yield "data: [DONE]\n\n"
