"""An OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions (whole or streamed, n, seed, logprobs (also streamed),
tools and tool_choice, reasoning_content), /v1/completions, /health and /metrics, over one model or several
adapters of one base (the request's `model` picks).

Requests run concurrently in the batching engine (serve/service.py); when `max_queue` already wait for a
row, the next gets a 429. Every bad request gets a 4xx with an OpenAI-style error body; unexpected
failures get a 500 body. The server never crashes on input.

Each route is a module-level handler in ROUTES; what a handler needs of the server (the service, the served
models, the limits) comes as one Server argument. Bodies are read in serve/requests.py, answers written in
serve/responses.py.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import PlainTextResponse, StreamingResponse

from peftkit.errors import ConfigError
from peftkit.infer.jobs import QueueFull
from peftkit.serve.requests import CHAT_READER, COMPLETIONS_READER, MAX_BODY_BYTES, ApiError, Reader, _parse, _read_json
from peftkit.serve.responses import CHAT_WRITER, COMPLETIONS_WRITER, Header, Writer, _completion, _error_response, _sse
from peftkit.serve.service import Outcome, Request, Service


@dataclass(frozen=True)
class Server:
    """What the handlers share: the service, served name → adapter (None: the model as loaded), the limits, and
    the pool whose threads wait for tokens."""

    service: Service
    models: dict[str, str | None]
    max_tokens_limit: int
    max_body_bytes: int
    waiting: ThreadPoolExecutor


async def _server(http: HttpRequest) -> Server:
    """The app's Server, for a handler's `ServerDep` argument (async: no worker thread per request)."""
    return http.app.state.server


ServerDep = Annotated[Server, Depends(_server)]


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


async def list_models(server: ServerDep) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "peftkit"}
                                       for name in server.models]}


async def health() -> dict[str, str]:
    return {"status": "ok"}


async def metrics(server: ServerDep) -> Any:
    """Prometheus' text format, as vLLM's /metrics."""
    lines = [f"peftkit_{k} {v}" for k, v in server.service.metrics().items()]
    return PlainTextResponse("\n".join(lines) + "\n")


async def chat_completions(http: HttpRequest, server: ServerDep) -> Any:
    return await _complete(http, server, CHAT_READER, CHAT_WRITER)


async def completions(http: HttpRequest, server: ServerDep) -> Any:
    return await _complete(http, server, COMPLETIONS_READER, COMPLETIONS_WRITER)


# (method, path, handler), registered in this order: a new endpoint is a handler and a line here
ROUTES: list[tuple[str, str, Callable[..., Awaitable[Any]]]] = [
    ("GET", "/v1/models", list_models),
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/completions", completions),
]


def create_app(service: Service, models: str | dict[str, str | None], api_key: str | None = None,
               max_tokens_limit: int = 1024, max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The FastAPI app; `models` maps each served name to its adapter (None: the model as loaded); a plain
    name serves the model as loaded. `api_key` set means every request needs `Authorization: Bearer <key>`."""
    served: dict[str, str | None] = {models: None} if isinstance(models, str) else dict(models)
    # Waiting for tokens blocks a thread per request in flight; they get their own pool, so a full house
    # never starves the default pool that tokenizes new requests (which then could not even be refused).
    waiting = ThreadPoolExecutor(service.engine.slots + (service.engine.max_queue or 64) + 8, "peftkit-wait")
    app = FastAPI(title="peftkit", docs_url=None, redoc_url=None)
    app.state.server = Server(service, served, max_tokens_limit, max_body_bytes, waiting)
    app.add_middleware(_Guard, api_key=api_key)
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return app


async def _complete(http: HttpRequest, server: Server, reader: Reader, writer: Writer) -> Any:
    """One chat.completions or completions request: read, checked against the context window, queued, then
    answered whole or streamed; generation stops when the client goes away."""
    service = server.service
    try:
        body = await _read_json(http, server.max_body_bytes)
        request, stream, include_usage = _parse(body, server.models, server.max_tokens_limit, reader)
        ids, pixels = await asyncio.to_thread(_prompt, service, request)  # off the event loop
        prompt_len = len(ids)
        if prompt_len + request.max_tokens > service.context_window:
            raise ApiError(400, f"This model's context window is {service.context_window} tokens; the prompt has "
                           f"{prompt_len} and max_tokens asks for {request.max_tokens} more",
                           "context_length_exceeded", "messages")
        jobs = service.submit(request, ids, pixels)
    except ApiError as e:
        return _error_response(e.status, e.message, e.code, e.param)
    except QueueFull as e:
        return _error_response(429, f"the server is busy ({e}); retry later", "rate_limit_exceeded")
    name = body["model"]
    header = Header(f"{writer.id_prefix}-{uuid.uuid4().hex}", int(time.time()), name)
    cancel = threading.Event()  # set when the client goes away: generation stops at the next token
    if stream:
        events = _sse(service, request, jobs, header, include_usage, cancel, writer)
        return StreamingResponse(_until_disconnect(events, cancel, server.waiting), media_type="text/event-stream")
    outcomes = [Outcome() for _ in jobs]

    def answer() -> list[str]:
        return ["".join(service.stream(request, job, o, cancel)) for job, o in zip(jobs, outcomes)]

    work = asyncio.get_running_loop().run_in_executor(server.waiting, answer)
    while not work.done():
        await asyncio.wait([work], timeout=0.25)
        if not work.done() and await http.is_disconnected():
            cancel.set()
            for job in jobs:
                job.cancel()
    return _completion(service, request, work.result(), outcomes, header, len(ids), writer)


def _prompt(service: Service, request: Request) -> tuple[list[int], Any]:
    try:
        return service.prompt(request)
    except ConfigError as e:  # the chat template cannot show the tools / calls / reasoning (or images) asked for
        raise ApiError(400, f"this model cannot take the request: {'; '.join(e.issues)}", "unsupported_by_template",
                       "tools") from None
    except ValueError as e:  # an image that cannot be read, is too large, or is not allowed here
        raise ApiError(400, f"image: {e}", "invalid_image", "messages") from None


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
