"""An OpenAI-compatible HTTP API over one model: /v1/models and /v1/chat/completions (whole or streamed).

Every bad request gets a 4xx with an OpenAI-style error body; unexpected failures get a 500 body.
The server never crashes on input.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from peftkit.serve.engine import Engine, Outcome, Request

ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error_response(status: int, message: str, code: str, param: str | None = None) -> Any:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _parse(body: Any, model_name: str, max_tokens_limit: int) -> tuple[Request, bool]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_body")
    if body.get("model") != model_name:
        raise ApiError(404, f"The model {body.get('model')!r} does not exist; this server serves {model_name!r}",
                       "model_not_found", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "invalid_messages", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}] must be an object with string content", "invalid_messages", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)}",
                           "invalid_role", f"messages[{i}].role")
        clean.append({"role": m["role"], "content": m["content"]})
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "invalid_n", "n")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or min(256, max_tokens_limit)
    if not isinstance(max_tokens, int) or max_tokens < 1 or max_tokens > max_tokens_limit:
        raise ApiError(400, f"max_tokens={max_tokens!r} must be an integer from 1 to {max_tokens_limit}",
                       "invalid_max_tokens", "max_tokens")
    temperature, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
    for name, value, high in (("temperature", temperature, 2.0), ("top_p", top_p, 1.0)):
        if not isinstance(value, (int, float)) or not 0 <= value <= high:
            raise ApiError(400, f"{name}={value!r} must be a number from 0 to {high}", f"invalid_{name}", name)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", "invalid_stop", "stop")
    return Request(clean, max_tokens, float(temperature), float(top_p), stop), bool(body.get("stream", False))


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_tokens_limit: int = 1024) -> Any:
    """The FastAPI app; `api_key` set means every request needs `Authorization: Bearer <key>`."""
    app = FastAPI(title="peftkit", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next: Any) -> Any:
        if api_key is not None:
            header = request.headers.get("authorization", "")
            if not secrets.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
                return _error_response(401, "Incorrect API key provided", "invalid_api_key")
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 - the server answers, it does not die
            return _error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "peftkit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error_response(400, "the request body is not valid JSON", "invalid_json")
        try:
            request, stream = _parse(body, model_name, max_tokens_limit)
            ids = engine.prompt_ids(request.messages)
            prompt_len = len(ids)
            if prompt_len + request.max_tokens > engine.context_window:
                raise ApiError(400, f"This model's context window is {engine.context_window} tokens; the prompt has "
                               f"{prompt_len} and max_tokens asks for {request.max_tokens} more",
                               "context_length_exceeded", "messages")
        except ApiError as e:
            return _error_response(e.status, e.message, e.code, e.param)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            return StreamingResponse(_sse(engine, request, ids, ident, created, model_name, body), media_type="text/event-stream")
        outcome = Outcome()
        text = await asyncio.to_thread(lambda: "".join(engine.stream(request, ids, outcome)))
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": outcome.finish_reason}],
            "usage": _usage(outcome),
        }

    return app


def _usage(outcome: Outcome) -> dict[str, int]:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def _sse(engine: Engine, request: Request, ids: list[int], ident: str, created: int, model_name: str, body: dict) -> Iterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

    A sync generator: Starlette runs it in a thread pool, so the event loop stays free while
    the engine's lock queues this request behind others.
    """
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        data: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    outcome = Outcome()
    yield chunk({"role": "assistant", "content": ""})
    try:
        for text in engine.stream(request, ids, outcome):
            yield chunk({"content": text})
    except Exception as e:  # noqa: BLE001 - report in-band; the response has already started
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        return
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    yield chunk({}, outcome.finish_reason, _usage(outcome) if include_usage else None)
    yield "data: [DONE]\n\n"
