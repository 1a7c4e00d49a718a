"""Answers written as OpenAI writes them: a whole chat.completion / text_completion body, or server-sent chunks
ending with `data: [DONE]`, and the error body; what /v1/chat/completions and /v1/completions write differently
is one Writer each."""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from peftkit.infer.jobs import Job
from peftkit.infer.tools import Call, DeltaSplitter, Parsed, parse_output
from peftkit.serve.service import Outcome, Request, Service

Entries = list[tuple[int, float, list[tuple[int, float]]]]  # (token, log-probability, alternatives) per token
Piece = tuple[dict[str, Any], str | None]  # a streamed choice's fields (delta or text) and its finish reason


def _error_response(status: int, message: str, code: str, param: str | None = None) -> Any:
    kind = "invalid_request_error" if status < 500 else "server_error"
    kind = "rate_limit_error" if status == 429 else kind
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


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


def _chat_choice(request: Request, text: str, finish: str) -> tuple[dict[str, Any], str]:
    """A whole chat answer's {message} (reasoning and tool calls parsed out) and its finish reason."""
    parsed = _answer(request, text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning is not None:
        message["reasoning_content"] = parsed.reasoning
    if parsed.calls:
        message["content"] = parsed.content or None
        message["tool_calls"] = [_tool_call(c) for c in parsed.calls]
        finish = "tool_calls" if finish == "stop" else finish
    return {"message": message}, finish


def _chat_logprobs(tokenizer: Any, entries: Entries, offset: int = 0) -> dict[str, Any]:
    """Chat's logprobs: {content: [{token, logprob, bytes, top_logprobs}]} (no offsets: `offset` is unused)."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        piece = tokenizer.decode([token])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]} for t, lp, top in entries]}


def _text_logprobs(tokenizer: Any, entries: Entries, offset: int = 0) -> dict[str, Any]:
    """The completions API's logprobs: {tokens, token_logprobs, top_logprobs, text_offset}, offsets counted from
    `offset` characters into the completion."""
    def text(token: int) -> str:
        return tokenizer.decode([token])

    def alternatives(top: list[tuple[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for token, logprob in top:  # most likely first: two tokens of one text keep the likelier
            out.setdefault(text(token), logprob)
        return out

    tokens = [text(t) for t, _, _ in entries]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))[: len(tokens)]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [alternatives(top) for _, _, top in entries], "text_offset": offsets}


def _chat_chunks(service: Service, request: Request, job: Job, outcome: Outcome,
                 cancel: threading.Event) -> Iterator[Piece]:
    """One chat answer streamed: the role, then content / reasoning deltas and each tool call whole (a forced
    call: its arguments as they are generated)."""
    yield {"delta": {"role": "assistant", "content": ""}}, None
    if request.call is not None:
        head = _tool_call(Call(request.call, {}), 0)
        head["function"]["arguments"] = ""
        yield {"delta": {"tool_calls": [head]}}, None
        for text in service.stream(request, job, outcome, cancel):
            yield {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}}, None
        yield {"delta": {}}, "tool_calls" if outcome.finish_reason == "stop" else outcome.finish_reason
        return
    splitter = DeltaSplitter(request.tools is not None)
    for text in service.stream(request, job, outcome, cancel):
        for delta in splitter.feed(text):
            yield {"delta": delta}, None
    deltas, calls = splitter.finish()
    for delta in deltas:
        yield {"delta": delta}, None
    for i, call in enumerate(calls or []):  # each call whole: OpenAI clients join the deltas either way
        yield {"delta": {"tool_calls": [_tool_call(call, i)]}}, None
    yield {"delta": {}}, "tool_calls" if calls and outcome.finish_reason == "stop" else outcome.finish_reason


def _text_chunks(service: Service, request: Request, job: Job, outcome: Outcome,
                 cancel: threading.Event) -> Iterator[Piece]:
    """One completion streamed: its text as it comes, then the finish reason."""
    for text in service.stream(request, job, outcome, cancel):
        yield {"text": text}, None
    yield {"text": ""}, outcome.finish_reason


@dataclass(frozen=True)
class Writer:
    """What one API writes its own way, whole and streamed."""

    id_prefix: str  # of the answer's id
    object: str  # of a whole answer
    chunk_object: str  # of a streamed chunk
    choice: Callable[[Request, str, str], tuple[dict[str, Any], str]]  # a whole answer's fields and finish reason
    logprobs: Callable[[Any, Entries, int], dict[str, Any]]  # OpenAI's logprobs, `offset` characters into the answer
    chunks: Callable[[Service, Request, Job, Outcome, threading.Event], Iterator[Piece]]  # one answer streamed


CHAT_WRITER = Writer("chatcmpl", "chat.completion", "chat.completion.chunk", _chat_choice, _chat_logprobs, _chat_chunks)
COMPLETIONS_WRITER = Writer("cmpl", "text_completion", "text_completion",
                            lambda request, text, finish: ({"text": text, "logprobs": None}, finish),
                            _text_logprobs, _text_chunks)


@dataclass(frozen=True)
class Header:
    """What every body and chunk of one response repeats: its id, creation time and the model name asked for."""

    id: str
    created: int
    model: str


def _completion(service: Service, request: Request, texts: list[str], outcomes: list[Outcome], header: Header,
                prompt_tokens: int, writer: Writer) -> dict[str, Any]:
    """A chat.completion (or text_completion) body: one choice per answer, with logprobs when asked."""
    choices = []
    for k, (text, o) in enumerate(zip(texts, outcomes)):
        answer, finish = writer.choice(request, text, o.finish_reason)
        choice: dict[str, Any] = {"index": k, **answer, "finish_reason": finish}
        if request.logprobs is not None:
            choice["logprobs"] = writer.logprobs(service.tokenizer, o.logprobs, 0)
        choices.append(choice)
    completion = sum(o.completion_tokens for o in outcomes)
    return {"id": header.id, "object": writer.object, "created": header.created, "model": header.model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


def _sse(service: Service, request: Request, jobs: list[Job], header: Header, include_usage: bool,
         cancel: threading.Event, writer: Writer) -> Generator[str, None, None]:
    """Server-sent events in OpenAI's chunk format, choice by choice, ending with `data: [DONE]`."""
    outcomes = [Outcome() for _ in jobs]
    reported = [0] * len(jobs)  # each answer's tokens whose logprobs a chunk has carried
    texts = [0] * len(jobs)  # characters of each completion sent (the completions API's text_offset)

    def chunk(index: int, fields: dict, finish: str | None) -> str:
        choice: dict[str, Any] = {"index": index, **fields}
        if request.logprobs is not None:  # the tokens generated since the last chunk (the finish chunk: the rest)
            pending = outcomes[index].logprobs[reported[index]:]
            reported[index] += len(pending)
            choice["logprobs"] = writer.logprobs(service.tokenizer, pending, texts[index]) if pending else None
        texts[index] += len(choice.get("text", ""))
        data: dict[str, Any] = {"id": header.id, "object": writer.chunk_object, "created": header.created,
                                "model": header.model, "choices": [{**choice, "finish_reason": finish}]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        for k, (job, outcome) in enumerate(zip(jobs, outcomes)):
            for fields, finish in writer.chunks(service, request, job, outcome, cancel):
                yield chunk(k, fields, finish)
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
        data = {"id": header.id, "object": writer.chunk_object, "created": header.created, "model": header.model,
                "choices": [], "usage": usage}
        yield f"data: {json.dumps(data)}\n\n"
    yield "data: [DONE]\n\n"
