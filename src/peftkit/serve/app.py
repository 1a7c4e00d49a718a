"""An OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions (whole or streamed, n, seed, logprobs (also streamed),
tools and tool_choice, reasoning_content), /v1/completions, /health and /metrics, over one model or several
adapters of one base (the request's `model` picks).

Requests run concurrently in the batching engine (serve/engine.py); when `max_queue` already wait for a
row, the next gets a 429. Every bad request gets a 4xx with an OpenAI-style error body; unexpected
failures get a 500 body. The server never crashes on input.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from peftkit.data.formats import Message, normalize_tool_calls, normalize_tools
from peftkit.errors import ConfigError
from peftkit.infer.jobs import Job, QueueFull
from peftkit.infer.tools import Call, DeltaSplitter, Parsed, parse_output
from peftkit.serve.engine import Outcome, Request, Service

ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error_response(status: int, message: str, code: str, param: str | None = None) -> Any:
    kind = "invalid_request_error" if status < 500 else "server_error"
    kind = "rate_limit_error" if status == 429 else kind
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


MAX_BODY_BYTES = 1 << 20  # 1 MiB: far beyond any context window here; larger bodies get a 413 before parsing


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _content(m: Any, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {type: text, text} parts (null for an assistant's call)."""
    content = m.get("content") if isinstance(m, dict) else None
    if content is None and isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls"):
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}] must be an object with string content (or a list of text parts)",
                       "invalid_messages", f"messages[{i}]")
    return content


MAX_N = 8  # answers per request
MAX_TOP_LOGPROBS = 20  # as OpenAI


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


def _parse(body: Any, models: dict[str, str | None], max_tokens_limit: int,
           chat: bool = True) -> tuple[Request, bool, bool]:
    """(request, stream, include_usage) from a chat.completions body (or, `chat` false, a completions body:
    a `prompt` string, continued as it is); every type is checked (ApiError 4xx)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_body")
    if not isinstance(body.get("model"), str) or body["model"] not in models:
        raise ApiError(404, f"The model {body.get('model')!r} does not exist; this server serves "
                       f"{', '.join(map(repr, models))}", "model_not_found", "model")
    clean = _messages(body.get("messages")) if chat else []
    prompt = None if chat else body.get("prompt")
    if not chat and (not isinstance(prompt, str) or not prompt):
        raise ApiError(400, "prompt must be a non-empty string", "invalid_prompt", "prompt")
    n = _int_in(body, "n", 1, MAX_N, 1)
    seed = _int_in(body, "seed", -(2**63), 2**63 - 1, None)
    logprobs = _logprobs_asked(body) if chat else _int_in(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
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
    tools, call = _tools(body) if chat else (None, None)
    if tools and fmt == {"type": "json_object"}:
        raise ApiError(400, "response_format json_object cannot be combined with tools", "invalid_response_format",
                       "response_format")
    request = Request(clean, max_tokens, sampling["temperature"], sampling["top_p"], stop, seed=seed, n=n or 1,
                      logprobs=logprobs, adapter=models[body["model"]], json=fmt == {"type": "json_object"},
                      prompt=prompt, tools=tools, call=call)
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


def create_app(service: Service, models: str | dict[str, str | None], api_key: str | None = None,
               max_tokens_limit: int = 1024, max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The FastAPI app; `models` maps each served name to its adapter (None: the model as loaded); a plain
    name serves the model as loaded. `api_key` set means every request needs `Authorization: Bearer <key>`."""
    from fastapi.responses import PlainTextResponse

    served: dict[str, str | None] = {models: None} if isinstance(models, str) else dict(models)
    # Waiting for tokens blocks a thread per request in flight; they get their own pool, so a full house
    # never starves the default pool that tokenizes new requests (which then could not even be refused).
    waiting = ThreadPoolExecutor(service.engine.slots + (service.engine.max_queue or 64) + 8, "peftkit-wait")
    app = FastAPI(title="peftkit", docs_url=None, redoc_url=None)
    app.add_middleware(_Guard, api_key=api_key)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "peftkit"}
                                           for name in served]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Any:
        """Prometheus' text format, as vLLM's /metrics."""
        lines = [f"peftkit_{k} {v}" for k, v in service.metrics().items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        return await handle(http, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        return await handle(http, chat=False)

    async def handle(http: HttpRequest, chat: bool) -> Any:
        try:
            body = await _read_json(http, max_body_bytes)
            request, stream, include_usage = _parse(body, served, max_tokens_limit, chat)
            ids = await asyncio.to_thread(_prompt_ids, service, request)  # off the event loop
            prompt_len = len(ids)
            if prompt_len + request.max_tokens > service.context_window:
                raise ApiError(400, f"This model's context window is {service.context_window} tokens; the prompt has "
                               f"{prompt_len} and max_tokens asks for {request.max_tokens} more",
                               "context_length_exceeded", "messages")
            jobs = service.submit(request, ids)
        except ApiError as e:
            return _error_response(e.status, e.message, e.code, e.param)
        except QueueFull as e:
            return _error_response(429, f"the server is busy ({e}); retry later", "rate_limit_exceeded")
        name = body["model"]
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        cancel = threading.Event()  # set when the client goes away: generation stops at the next token
        if stream:
            events = _sse(service, request, jobs, ident, created, name, include_usage, cancel, chat)
            return StreamingResponse(_until_disconnect(events, cancel, waiting), media_type="text/event-stream")
        outcomes = [Outcome() for _ in jobs]

        def answer() -> list[str]:
            return ["".join(service.stream(request, job, o, cancel)) for job, o in zip(jobs, outcomes)]

        work = asyncio.get_running_loop().run_in_executor(waiting, answer)
        while not work.done():
            await asyncio.wait([work], timeout=0.25)
            if not work.done() and await http.is_disconnected():
                cancel.set()
                for job in jobs:
                    job.cancel()
        return _completion(service, request, work.result(), outcomes, ident, created, name, len(ids), chat)

    return app


def _prompt_ids(service: Service, request: Request) -> list[int]:
    try:
        return service.prompt_ids(request)
    except ConfigError as e:  # the chat template cannot show the tools / calls / reasoning asked for
        raise ApiError(400, f"this model cannot take the request: {'; '.join(e.issues)}", "unsupported_by_template",
                       "tools") from None


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


def _completion(service: Service, request: Request, texts: list[str], outcomes: list[Outcome], ident: str,
                created: int, name: str, prompt_tokens: int, chat: bool = True) -> dict[str, Any]:
    """A chat.completion (or text_completion) body: one choice per answer, with logprobs when asked."""
    choices = []
    for k, (text, o) in enumerate(zip(texts, outcomes)):
        answer: dict[str, Any] = {"text": text, "logprobs": None}
        finish = o.finish_reason
        if chat:
            parsed = _answer(request, text)
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
            if parsed.reasoning is not None:
                message["reasoning_content"] = parsed.reasoning
            if parsed.calls:
                message["content"] = parsed.content or None
                message["tool_calls"] = [_tool_call(c) for c in parsed.calls]
                finish = "tool_calls" if finish == "stop" else finish
            answer = {"message": message}
        choice: dict[str, Any] = {"index": k, **answer, "finish_reason": finish}
        if request.logprobs is not None:
            choice["logprobs"] = _logprobs(service.tokenizer, o.logprobs, chat)
        choices.append(choice)
    completion = sum(o.completion_tokens for o in outcomes)
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created, "model": name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


def _answer(request: Request, text: str) -> Parsed:
    """The answer's reasoning, content and tool calls; a forced call's text is its arguments object."""
    if request.call is None:
        return parse_output(text, request.tools is not None)
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError:  # cut short by max_tokens: the text as it is
        return Parsed(text)
    return Parsed("", None, [Call(request.call, arguments)]) if isinstance(arguments, dict) else Parsed(text)


def _tool_call(call: Call, index: int | None = None) -> dict[str, Any]:
    """OpenAI's tool call: an id, and the arguments as a JSON string."""
    out: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                           "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return out if index is None else {"index": index, **out}


def _logprobs(tokenizer: Any, entries: list[tuple[int, float, list[tuple[int, float]]]], chat: bool,
              offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs of `entries` (token, log-probability, alternatives): chat's {content: [{token, logprob,
    bytes, top_logprobs}]}, or the completions API's {tokens, token_logprobs, top_logprobs, text_offset} with
    offsets counted from `offset` characters into the completion."""
    def text(token: int) -> str:
        return tokenizer.decode([token])

    if chat:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            piece = text(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]} for t, lp, top in entries]}
    def alternatives(top: list[tuple[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for token, logprob in top:  # most likely first: two tokens of one text keep the likelier
            out.setdefault(text(token), logprob)
        return out

    tokens = [text(t) for t, _, _ in entries]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))[: len(tokens)]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [alternatives(top) for _, _, top in entries], "text_offset": offsets}


async def _until_disconnect(events: Generator[str, None, None], cancel: threading.Event,
                            pool: ThreadPoolExecutor) -> AsyncIterator[str]:
    """The sync event generator, each step in a worker thread; however the response ends (a client that
    disconnects cancels this generator), `cancel` is set so the generation behind it stops too."""
    stepping = threading.Lock()  # held while a worker thread runs the generator one step

    def step() -> str | None:
        with stepping:
            return next(events, None)

    def close() -> None:  # after any step in flight: closing cancels the jobs now, not at GC
        with stepping:
            events.close()

    try:
        while True:
            event = await asyncio.get_running_loop().run_in_executor(pool, step)
            if event is None:
                return
            yield event
    finally:
        cancel.set()
        threading.Thread(target=close, daemon=True).start()


def _sse(service: Service, request: Request, jobs: list[Job], ident: str, created: int, model_name: str,
         include_usage: bool, cancel: threading.Event, chat: bool = True) -> Generator[str, None, None]:
    """Server-sent events in OpenAI's chunk format, choice by choice, ending with `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    outcomes = [Outcome() for _ in jobs]
    reported = [0] * len(jobs)  # each answer's tokens whose logprobs a chunk has carried
    texts = [0] * len(jobs)  # characters of each completion sent (the completions API's text_offset)

    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        choice: dict[str, Any] = {"index": index, "delta": delta} if chat else {"index": index,
                                                                                "text": delta.get("content", "")}
        if request.logprobs is not None:  # the tokens generated since the last chunk (the finish chunk: the rest)
            pending = outcomes[index].logprobs[reported[index]:]
            reported[index] += len(pending)
            choice["logprobs"] = _logprobs(service.tokenizer, pending, chat, texts[index]) if pending else None
        texts[index] += len(choice.get("text", ""))
        data: dict[str, Any] = {"id": ident, "object": kind, "created": created, "model": model_name,
                                "choices": [{**choice, "finish_reason": finish}]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        for k, (job, outcome) in enumerate(zip(jobs, outcomes)):
            if not chat:
                for text in service.stream(request, job, outcome, cancel):
                    yield chunk(k, {"content": text})
                yield chunk(k, {}, outcome.finish_reason)
                continue
            yield chunk(k, {"role": "assistant", "content": ""})
            if request.call is not None:  # a forced call: its arguments stream as they are generated
                head = _tool_call(Call(request.call, {}), 0)
                head["function"]["arguments"] = ""
                yield chunk(k, {"tool_calls": [head]})
                for text in service.stream(request, job, outcome, cancel):
                    yield chunk(k, {"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
                yield chunk(k, {}, "tool_calls" if outcome.finish_reason == "stop" else outcome.finish_reason)
                continue
            splitter = DeltaSplitter(request.tools is not None)
            for text in service.stream(request, job, outcome, cancel):
                for delta in splitter.feed(text):
                    yield chunk(k, delta)
            deltas, calls = splitter.finish()
            for delta in deltas:
                yield chunk(k, delta)
            for i, call in enumerate(calls or []):  # each call whole: OpenAI clients join the deltas either way
                yield chunk(k, {"tool_calls": [_tool_call(call, i)]})
            finish = "tool_calls" if calls and outcome.finish_reason == "stop" else outcome.finish_reason
            yield chunk(k, {}, finish)
    except Exception as e:  # noqa: BLE001 - report in-band; the response has already started
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        return
    finally:
        for job in jobs:
            job.cancel()
    if include_usage:
        completion = sum(o.completion_tokens for o in outcomes)
        usage = {"prompt_tokens": len(jobs[0].prompt), "completion_tokens": completion,
                 "total_tokens": len(jobs[0].prompt) + completion}
        data = {"id": ident, "object": kind, "created": created, "model": model_name, "choices": [], "usage": usage}
        yield f"data: {json.dumps(data)}\n\n"
    yield "data: [DONE]\n\n"
