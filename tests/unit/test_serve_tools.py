"""Tools and reasoning over the served API: the official openai client gets tool_calls it can parse and
feed back as a `tool` message; streamed deltas join into the same answer; malformed calls stay content."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from peftkit.infer.tools import DeltaSplitter, parse_output
from tests.unit.test_serve import KEY, start_server

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
FORCE = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def tool_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = tmp_path_factory.mktemp("serve_tools") / "serve.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{template: chatml}}\n"
                      f"train: {{output_dir: {config.parent / 'unused'}}}\n")
    for base in start_server("--config", str(config)):
        yield openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)


def test_forced_call_round_trip_with_the_openai_client(tool_server: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = tool_server.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=FORCE,
                                                max_tokens=48, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)  # a random model, but JSON mode: valid arguments
    # The client feeds the call and its result back, as the OpenAI docs show, and gets an answer.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})}]
    final = tool_server.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                                max_tokens=8, temperature=0)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content is not None


def test_streamed_forced_call_joins_to_the_whole_answer(tool_server: openai.OpenAI) -> None:
    args = {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Lyon?"}], "tools": TOOLS,
            "tool_choice": FORCE, "max_tokens": 48, "temperature": 0}
    whole = tool_server.chat.completions.create(**args).choices[0].message.tool_calls[0]
    name, arguments, finish = "", "", None
    for chunk in tool_server.chat.completions.create(**args, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index == 0
            name += delta.function.name or ""
            arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, arguments, finish) == ("get_weather", whole.function.arguments, "tool_calls")


def test_auto_answers_without_a_call_are_plain_content(tool_server: openai.OpenAI) -> None:
    # The random model writes no <tool_call>: its text is the content, finish_reason stop.
    answer = tool_server.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 tools=TOOLS, max_tokens=8, temperature=0).choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"tool_choice": "required"}, "invalid_tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "invalid_tool_choice"),
    ({"tools": [{"type": "function"}]}, "invalid_tools"),
    ({"tools": None, "tool_choice": "auto"}, "invalid_tool_choice"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]}, "invalid_messages"),
])
def test_bad_tool_requests_are_400(tool_server: openai.OpenAI, kwargs: dict, code: str) -> None:
    args = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS, "max_tokens": 4}
    with pytest.raises(openai.BadRequestError) as e:
        tool_server.chat.completions.create(**{**args, **kwargs})
    assert e.value.code == code


def test_parse_output_formats() -> None:
    hermes = '<think>Need data.</think>\n\nOne moment.\n<tool_call>\n{"name": "get_weather", "arguments": ' \
             '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}' \
             '\n</tool_call>'
    parsed = parse_output(hermes, tools=True)
    assert (parsed.reasoning, parsed.content) == ("Need data.", "One moment.")
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", {"city": "Paris"}),
                                                              ("get_weather", {"city": "Lyon"})]
    llama = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert parse_output(llama, tools=True).calls[0].arguments == {"city": "Paris"}
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    assert parse_output(broken, tools=True).calls is None and parse_output(broken, tools=True).content == broken
    assert parse_output('{"a": 1}', tools=True).calls is None  # JSON, but no call: content
    assert parse_output(hermes, tools=False).calls is None  # tools not offered: nothing is parsed as a call
    assert parse_output("7 plus 2.</think>9", tools=False).reasoning == "7 plus 2."  # <think> was in the prompt


@pytest.mark.parametrize("text", [
    '<think>Need data.</think>\n\nOne moment. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
    '{"name": "f", "parameters": {"a": [1, 2]}}', "A plain answer { with a brace.", "<think>cut short",
    '<tool_call>\n{"name": "f", "arguments": {"a": ', "<tool", "Done.\n\n"])
def test_streamed_deltas_join_to_the_parsed_answer(text: str) -> None:
    splitter, deltas = DeltaSplitter(tools=True), []
    for ch in text:  # the worst case: one character per piece
        deltas += splitter.feed(ch)
    rest, calls = splitter.finish()
    deltas += rest
    parsed = parse_output(text, tools=True)
    assert "".join(d.get("reasoning_content", "") for d in deltas) == (parsed.reasoning or "")
    assert "".join(d.get("content", "") for d in deltas) == parsed.content
    assert calls == parsed.calls
