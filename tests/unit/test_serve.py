"""The OpenAI-compatible server, end to end: a real process on 127.0.0.1 and the official openai client."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from peftkit.serve.service import StopScanner

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> Iterator[str]:
    """`peftkit serve ARGS` on a free port with the test key, max tokens 64, model name tiny: its base URL
    while it runs."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftkit", "serve", *args, "--port", str(port),
         "--api-key", KEY, "--max-tokens-limit", "64", "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    yield from start_server("--model", str(tiny_model_dir))


@pytest.fixture()
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, **kwargs):
    args = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
    return client.chat.completions.create(**{**args, **kwargs})


def test_models_and_completion(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = _ask(client)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert _ask(client).choices[0].message.content == choice.message.content  # greedy is deterministic


def test_streaming_matches_the_whole_answer(client: openai.OpenAI) -> None:
    whole = _ask(client).choices[0].message.content
    chunks = list(_ask(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8  # OpenAI's usage chunk


def test_completions_continue_a_raw_prompt(client: openai.OpenAI, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    raw = AutoTokenizer.from_pretrained(tiny_model_dir)("Once upon a time")["input_ids"]  # no chat template around it
    assert whole.usage.prompt_tokens == len(raw) and whole.usage.completion_tokens <= 6
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    two = client.completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=1.0, seed=5, n=2)
    assert [c.index for c in two.choices] == [0, 1]


def test_auth_required(server: str) -> None:
    bad = openai.OpenAI(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.post(f"{server}/chat/completions", json={}).status_code == 401


@pytest.mark.parametrize(
    ("kwargs", "error", "code"),
    [
        ({"model": "gpt-4"}, openai.NotFoundError, "model_not_found"),
        ({"messages": []}, openai.BadRequestError, "invalid_messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, openai.BadRequestError, "invalid_role"),
        ({"messages": [{"role": "user"}]}, openai.BadRequestError, "invalid_messages"),
        ({"max_tokens": 65}, openai.BadRequestError, "invalid_max_tokens"),
        ({"n": 9}, openai.BadRequestError, "invalid_n"),
        ({"top_logprobs": 2}, openai.BadRequestError, "invalid_top_logprobs"),
        ({"response_format": {"type": "json_schema"}}, openai.BadRequestError, "invalid_response_format"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, openai.BadRequestError, "context_length_exceeded"),
    ],
)
def test_bad_requests_get_openai_errors(client: openai.OpenAI, kwargs: dict, error: type, code: str) -> None:
    with pytest.raises(error) as e:
        _ask(client, **kwargs)
    assert e.value.body["code"] == code and e.value.body["message"]


def test_template_without_tools_is_a_400_not_a_500(client: openai.OpenAI) -> None:
    # The plain server's tiny tokenizer template prints role and content only.
    with pytest.raises(openai.BadRequestError, match="cannot show the record's `tools`"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_malformed_json_body(server: str) -> None:
    r = httpx.post(f"{server}/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_sixteen_concurrent_requests_all_answered(client: openai.OpenAI) -> None:
    def one(i: int) -> tuple[str, str | None]:
        messages = [{"role": "user", "content": f"Request number {i}"}]
        if i % 2:
            chunks = list(_ask(client, messages=messages, stream=True))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].choices[0].finish_reason
        reply = _ask(client, messages=messages)
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    start = time.time()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    seconds = time.time() - start
    assert len(answers) == 16 and all(isinstance(text, str) and finish in ("stop", "length") for text, finish in answers)
    print(f"16 concurrent requests (8 streaming) answered in {seconds:.2f} s ({16 / seconds:.1f} requests/s)")


def test_stop_scanner_never_emits_a_stop_string() -> None:
    scanner = StopScanner(["END"])
    pieces = [scanner.feed(p) for p in ["Hello E", "N", "D and more"]]
    assert "".join(pieces) + scanner.flush() == "Hello " and scanner.stopped
    plain = StopScanner([])
    assert plain.feed("abc") + plain.flush() == "abc"
