"""Tool calls and reasoning in training data: formats map onto one structure, labels are exactly the
assistant turns as `apply_chat_template(tools=...)` renders them, and a template that cannot show them fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.config.schema import DataArgs
from peftkit.constants import IGNORE_INDEX
from peftkit.data import apply_template, build_dataset, encode_messages
from peftkit.data.encode import Encoding, encode_samples
from peftkit.data.formats import Where, sharegpt
from peftkit.errors import ConfigError, DataError
from tests.helpers import ASSETS, REPO, chat_ids, expected_labels

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def call(city: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


SINGLE_CALL = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [call("Paris")]}]
PARALLEL = [{"role": "user", "content": "Paris and Lyon?"},
            {"role": "assistant", "content": "Checking both.", "tool_calls": [call("Paris"), call("Lyon")]}]
ROUND_TRIP = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [call("Paris")]},
              {"role": "tool", "content": '{"celsius": 21}', "name": "get_weather"},
              {"role": "assistant", "content": "21 degrees."},
              {"role": "user", "content": "Thanks!"},
              {"role": "assistant", "content": "You're welcome."}]
THINKING = [{"role": "user", "content": "Add 3 and 4."},
            {"role": "assistant", "content": "7", "reasoning_content": "3 plus 4 is 7."},
            {"role": "user", "content": "And 2 more?"},
            {"role": "assistant", "content": "9", "reasoning_content": "7 plus 2 is 9."}]


def assistant_turns(messages: list[dict]) -> list[int]:
    return [k for k, m in enumerate(messages) if m["role"] == "assistant"]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("messages", [SINGLE_CALL, PARALLEL, ROUND_TRIP], ids=["single", "parallel", "round_trip"])
def test_tool_conversations_label_exactly_as_apply_chat_template(tokenizer, template: str, messages) -> None:
    apply_template(tokenizer, template)
    example, cut = encode_messages(tokenizer, messages, 4096, ("f", 0), tools=TOOLS)
    assert not cut
    assert example["input_ids"] == chat_ids(tokenizer, messages, tools=TOOLS)
    assert example["labels"] == expected_labels(tokenizer, messages, assistant_turns(messages), tools=TOOLS)
    supervised = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert "get_weather" in supervised and '"Paris"' in supervised  # the call is learned ...
    assert "celsius" not in supervised and "Weather of a city" not in supervised  # ... results and tools are not


def test_tools_reach_the_prompt_and_calls_are_json(tokenizer) -> None:
    apply_template(tokenizer, "chatml")
    text = tokenizer.decode(encode_messages(tokenizer, PARALLEL, 4096, ("f", 0), tools=TOOLS)[0]["input_ids"])
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call><|im_end|>') in text


def test_plain_conversations_render_as_before(tokenizer) -> None:
    # Without tools or reasoning the shipped templates are the plain ChatML / Llama 3 ones.
    apply_template(tokenizer, "chatml")
    plain = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"


@pytest.mark.parametrize("mode", ["train", "mask", "drop"])
def test_reasoning_modes(tokenizer, mode: str) -> None:
    apply_template(tokenizer, "chatml")
    example, _ = encode_messages(tokenizer, THINKING, 4096, ("f", 0), reasoning=mode)
    supervised = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    if mode == "drop":
        plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in THINKING]
        assert example["input_ids"] == chat_ids(tokenizer, plain)
        assert example["labels"] == expected_labels(tokenizer, plain, [1, 3])
        return
    assert example["input_ids"] == chat_ids(tokenizer, THINKING)
    if mode == "train":
        assert example["labels"] == expected_labels(tokenizer, THINKING, [1, 3])
        assert supervised == ("<think>\n3 plus 4 is 7.\n</think>\n\n7<|im_end|>\n"
                              "<think>\n7 plus 2 is 9.\n</think>\n\n9<|im_end|>\n")
    else:  # the reasoning is in the input, only the answers are learned
        assert supervised == "7<|im_end|>\n9<|im_end|>\n"
        assert "3 plus 4 is 7." in tokenizer.decode(example["input_ids"])


def test_template_dropping_past_reasoning_gives_one_exact_example_per_turn(tokenizer) -> None:
    # render(messages[:2]) shows turn 1's reasoning; render(messages[:4]) does not: the labels of each turn are
    # placed in the history exactly as the template shows it at inference.
    apply_template(tokenizer, str(ASSETS / "drops_past_reasoning.jinja"))
    (first, second), = encode_samples(tokenizer, [{"messages": THINKING}], [("f", 0)], Encoding(4096))
    assert first.input_ids == chat_ids(tokenizer, THINKING[:2])
    assert first.labels == expected_labels(tokenizer, THINKING[:2], [1])
    assert second.input_ids == chat_ids(tokenizer, THINKING)
    assert second.labels == expected_labels(tokenizer, THINKING, [3])
    assert "3 plus 4" not in tokenizer.decode(second.input_ids)  # the history as the template shows it
    assert "<think>\n7 plus 2 is 9.\n</think>" in tokenizer.decode([t for t in second.labels if t != IGNORE_INDEX])
    (last,), = encode_samples(tokenizer, [{"messages": THINKING}], [("f", 0)], Encoding(4096, mask="last"))
    assert last.input_ids == second.input_ids and last.labels == second.labels


def test_template_without_tools_is_a_config_error(tokenizer) -> None:
    # The tiny tokenizer's own template prints role and content only: the calls would silently vanish.
    with pytest.raises(ConfigError, match=r"cannot show assistant `tool_calls`.*data.template: chatml or llama3"):
        encode_messages(tokenizer, SINGLE_CALL, 4096, ("f", 0))
    with pytest.raises(ConfigError, match=r"cannot show the record's `tools`"):
        encode_messages(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                        4096, ("f", 0), tools=TOOLS)
    with pytest.raises(ConfigError, match=r"cannot show assistant reasoning.*or data.reasoning: drop"):
        encode_messages(tokenizer, THINKING, 4096, ("f", 0))
    assert encode_messages(tokenizer, THINKING, 4096, ("f", 0), reasoning="drop")[0] is not None


def test_sharegpt_function_call_and_observation_map_onto_tool_calls() -> None:
    record = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"celsius": 21}'},
        {"from": "gpt", "value": "<think>It is mild.</think>\n21 degrees."}],
        "tools": json.dumps([TOOLS[0]["function"]])}  # glaive: bare schemas as JSON text
    sample = sharegpt(record, Where("f", 0))
    assert sample["tools"] == TOOLS
    assert sample["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call("Paris")]}
    assert sample["messages"][2] == {"role": "tool", "content": '{"celsius": 21}'}
    assert sample["messages"][3] == {"role": "assistant", "content": "21 degrees.", "reasoning_content": "It is mild."}


def test_openai_records_with_string_arguments_and_parallel_results() -> None:
    record = {"messages": [
        {"role": "user", "content": "Paris and Lyon?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21"},
        {"role": "tool", "tool_call_id": "c2", "content": "19"},
        {"role": "assistant", "content": "21 and 19.", "reasoning_content": "Both mild."}], "tools": TOOLS}
    messages = sharegpt(record, Where("f", 0))["messages"]
    assert messages[1]["content"] == "" and [c["function"]["arguments"] for c in messages[1]["tool_calls"]] == \
        [{"city": "Paris"}, {"city": "Lyon"}]
    assert messages[1]["tool_calls"][0]["id"] == "c1" and messages[3]["tool_call_id"] == "c2"
    assert messages[4]["reasoning_content"] == "Both mild."


@pytest.mark.parametrize(("record", "match"), [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(Paris)"}]},
     r"f: record 0, field 'conversations\[1\]': the tool call is not valid JSON"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"arguments": {}}'}]},
     r"conversations\[1\]': the tool call needs a function name"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1]"}}]}]}, r"messages\[1\].tool_calls': the tool call's arguments must"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "{oops"},
     r"f: record 0, field 'tools': tools is not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": [{"x": 1}]},
     r"'tools': tools\[0\] must be a function schema"),
])
def test_bad_tool_records_name_the_field(record: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        sharegpt(record, Where("f", "record 0"))


def test_glaive_demo_builds_with_chatml(tokenizer, tmp_path: Path) -> None:
    apply_template(tokenizer, "chatml")
    path = REPO / "data/demo/glaive_toolcall_en_demo.json"
    ds, report = build_dataset([str(path)], DataArgs(format="sharegpt", cutoff_len=4096, max_samples=40), tokenizer)
    assert report.examples == len(ds) == 40 and not report.dropped
    calls = [r for r in json.loads(path.read_text())[:40]
             if any(t["from"] == "function_call" for t in r["conversations"])]
    text = tokenizer.decode(ds[[i for i, r in enumerate(json.loads(path.read_text())[:40]) if r in calls][0]]["input_ids"])
    assert "<tool_call>" in text and "<tool_response>" in text and "<tools>" in text


@pytest.mark.parametrize("template", ["alpaca", "yuan2"])
def test_shipped_templates_without_tools_refuse_tool_records(tokenizer, template: str) -> None:
    apply_template(tokenizer, template)
    with pytest.raises(ConfigError, match="cannot show"):
        encode_messages(tokenizer, SINGLE_CALL, 4096, ("f", 0), tools=TOOLS)


def test_preference_pairs_with_tools_render_each_side_once(tokenizer) -> None:
    from peftkit.data.encode import encode_preferences, encode_unpaired

    apply_template(tokenizer, "chatml")
    chosen = {"role": "assistant", "content": "", "tool_calls": [call("Paris")]}
    rejected = {"role": "assistant", "content": "I cannot check the weather."}
    sample = {"messages": SINGLE_CALL[:1], "chosen": chosen, "rejected": rejected, "tools": TOOLS}
    (pair,), = encode_preferences(tokenizer, [sample], [("f", 0)], Encoding(4096))
    assert pair.input_ids == chat_ids(tokenizer, [*SINGLE_CALL[:1], chosen], tools=TOOLS)
    assert pair.extra["rejected_input_ids"] == chat_ids(tokenizer, [*SINGLE_CALL[:1], rejected], tools=TOOLS)
    (good, bad), = encode_unpaired(tokenizer, [sample], [("f", 0)], Encoding(4096))
    assert (good.input_ids, good.extra, bad.input_ids, bad.extra) == \
        (pair.input_ids, {"desirable": 1}, pair.extra["rejected_input_ids"], {"desirable": 0})


def test_the_heldout_split_is_reproducible() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_toolcall_heldout", REPO / "scripts/prepare_toolcall_heldout.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    records = json.loads((REPO / "data/demo/glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    heldout = prep.heldout(records)
    assert heldout == json.loads((REPO / "data/demo/glaive_toolcall_heldout.json").read_text(encoding="utf-8"))
    assert len(heldout) == 50 and sum(r["conversations"][-1]["from"] == "function_call" for r in heldout) == 28
