"""Data: formats, exact label masks against apply_chat_template, truncation that keeps responses, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.config.schema import DataArgs
from peftkit.constants import IGNORE_INDEX
from peftkit.data import SHIPPED_TEMPLATES, apply_template, build_dataset, describe_example, encode_messages
from peftkit.data.formats import alpaca
from peftkit.data.sources import read_records
from peftkit.errors import ConfigError, DataError

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 3 and 4."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "And 2 more?"},
    {"role": "assistant", "content": "9, done."},
]


def _ids(tokenizer, messages, gen=False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_alpaca_to_messages_with_system_and_history() -> None:
    record = {"system": "S", "history": [["q1", "a1"]], "instruction": "do", "input": "this", "output": "done"}
    assert alpaca(record, "f.json", 0) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "do\nthis"},
        {"role": "assistant", "content": "done"},
    ]


def test_labels_are_exactly_the_assistant_turns(tokenizer) -> None:
    example, cut = encode_messages(tokenizer, MESSAGES, 1024, ("f", 0))
    full = _ids(tokenizer, MESSAGES)
    assert not cut
    assert example["input_ids"] == full  # oracle: identical to apply_chat_template's rendering
    spans = []
    for k in (2, 4):  # each assistant turn: tokens between the generation prompt and the turn's end
        start, end = len(_ids(tokenizer, MESSAGES[:k], gen=True)), len(_ids(tokenizer, MESSAGES[: k + 1]))
        spans.append((start, end))
    expected = [IGNORE_INDEX] * len(full)
    for start, end in spans:
        expected[start:end] = full[start:end]
    assert example["labels"] == expected
    supervised = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert supervised == "7<|im_end|>\n9, done.<|im_end|>\n"  # the end-of-turn token is supervised


def test_truncation_keeps_the_response_and_the_generation_prompt(tokenizer) -> None:
    messages = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "The answer is short."}]
    example, cut = encode_messages(tokenizer, messages, 64, ("f", 0))
    assert cut and len(example["input_ids"]) == 64
    response = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(response) == "The answer is short.<|im_end|>\n"
    prompt = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab == IGNORE_INDEX])
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")


def test_long_response_keeps_at_least_half_the_budget(tokenizer) -> None:
    messages = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "answer " * 100}]
    example, _ = encode_messages(tokenizer, messages, 100, ("f", 0))
    assert sum(lab != IGNORE_INDEX for lab in example["labels"]) == 50


def test_record_whose_response_cannot_fit_is_dropped_and_reported(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": "x " * n, "output": "y"}) for n in (1, 2)) + "\n")
    ds, report = build_dataset([str(path)], DataArgs(cutoff_len=1), tokenizer)
    assert (report.records, report.examples, report.dropped) == (2, 0, 2)
    assert report.dropped_first == [f"{path}: record 0", f"{path}: record 1"]
    assert len(ds) == 0


def test_build_dataset_reports_counts(tokenizer, alpaca_file: Path) -> None:
    ds, report = build_dataset([str(alpaca_file)], DataArgs(), tokenizer)
    assert len(ds) == report.examples == 8
    assert report.supervised_tokens == sum(sum(lab != IGNORE_INDEX for lab in row) for row in ds["labels"])
    assert describe_example(tokenizer, ds[0]).endswith("[[Hello!<|im_end|>\n]]")


def test_template_that_rewrites_history_fails_loudly(tokenizer) -> None:
    # Drops earlier assistant turns when rendering (as some "thinking" templates do): no exact labels possible.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match=r"f.json: record 3: the chat template does not render assistant turn 4"):
        encode_messages(tokenizer, MESSAGES, 1024, ("f.json", 3))


@pytest.mark.parametrize("name", SHIPPED_TEMPLATES)
def test_shipped_templates_label_exactly(tokenizer, name: str) -> None:
    apply_template(tokenizer, name)
    example, _ = encode_messages(tokenizer, MESSAGES, 1024, ("f", 0))
    assert example["input_ids"] == _ids(tokenizer, MESSAGES)
    supervised = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert supervised.startswith("7") and "9, done." in supervised and "Add 3" not in supervised


def test_unknown_template_name(tokenizer) -> None:
    with pytest.raises(ConfigError, match="data.template='vicuna': neither a shipped template"):
        apply_template(tokenizer, "vicuna")


def test_template_from_a_jinja_file(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    apply_template(tokenizer, str(path))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "a|"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"instruction": "hi"}]', "record 0, field 'output': must be a string, got missing"),
        ('[{"instruction": "hi", "output": 3}]', "record 0, field 'output': must be a string, got a int"),
        ('[{"instruction": "hi", "output": "a", "history": [["q"]]}]', "field 'history': turn 0 must be a [query, answer] pair"),
        ('{"instruction": "hi"}', "a .json data file must hold a list of records"),
        ('[{"instruction": "hi",', "not valid JSON"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path: Path, content: str, message: str, tokenizer) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        build_dataset([str(path)], DataArgs(), tokenizer)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_jsonl_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"record 1: line 2 is not valid JSON"):
        read_records(str(path))
