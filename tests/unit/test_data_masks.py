"""Labels: exactly the assistant turns as apply_chat_template renders them, per masking mode; truncation; drops."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from peftkit.config.schema import DataArgs
from peftkit.constants import IGNORE_INDEX
from peftkit.data import SHIPPED_TEMPLATES, apply_template, build_dataset, describe_example, encode_messages
from peftkit.data.labels import DOES_NOT_FIT, FULLY_MASKED
from peftkit.errors import ConfigError, DataError
from tests.helpers import ASSETS, MESSAGES, SINGLE, expected_labels
from tests.helpers import chat_ids as _ids


def llama3_style(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    apply_template(tokenizer, str(ASSETS / "llama3_style.jinja"))
    return tokenizer


@pytest.mark.parametrize("template", ["own", "llama3_style"])
@pytest.mark.parametrize("messages", [SINGLE, MESSAGES], ids=["single_turn", "multi_turn"])
def test_conformance_with_apply_chat_template(tokenizer, template: str, messages) -> None:
    if template == "llama3_style":
        llama3_style(tokenizer)
    example, cut = encode_messages(tokenizer, messages, 1024, ("f", 0))
    assert not cut
    assert example["input_ids"] == _ids(tokenizer, messages)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    assert example["labels"] == expected_labels(tokenizer, messages, turns)
    eot = "<|eot_id|>" if template == "llama3_style" else "<|im_end|>"
    supervised = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert supervised.endswith(eot + ("" if template == "llama3_style" else "\n"))


def test_mask_modes_and_train_false(tokenizer) -> None:
    last, _ = encode_messages(tokenizer, MESSAGES, 1024, ("f", 0), mask="last")
    assert last["labels"] == expected_labels(tokenizer, MESSAGES, [4])
    every, _ = encode_messages(tokenizer, MESSAGES, 1024, ("f", 0), mask="all")
    assert every["labels"] == every["input_ids"] == _ids(tokenizer, MESSAGES)
    quiet = [*MESSAGES[:2], {**MESSAGES[2], "train": False}, *MESSAGES[3:]]
    skipped, _ = encode_messages(tokenizer, quiet, 1024, ("f", 0))
    assert skipped["input_ids"] == _ids(tokenizer, MESSAGES)
    assert skipped["labels"] == expected_labels(tokenizer, MESSAGES, [4])
    none = [*MESSAGES[:4], {**MESSAGES[4], "train": False}]
    assert encode_messages(tokenizer, none, 1024, ("f", 0), mask="last") == (None, False)


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


def test_mask_last_truncates_history_before_the_supervised_turn(tokenizer) -> None:
    long_history = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "answer " * 100},
                    {"role": "user", "content": "short?"}, {"role": "assistant", "content": "Yes."}]
    example, cut = encode_messages(tokenizer, long_history, 60, ("f", 0), mask="last")
    assert cut and len(example["input_ids"]) == 60
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == "Yes.<|im_end|>\n"


def test_dropped_records_are_counted_by_reason(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    records = [{"instruction": "x " * n, "output": "y"} for n in (1, 2)]
    records.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]})
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n")
    ds, report = build_dataset([str(path)], DataArgs(cutoff_len=1), tokenizer)
    assert (report.records, len(ds)) == (2, 0)
    assert report.datasets[0].drops.reasons == {DOES_NOT_FIT: {"count": 2, "first": f"{path}: line 1"}}
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps(records[2]) + "\n")
    ds, report = build_dataset([str(chat)], DataArgs(format="messages"), tokenizer)
    assert report.dropped == {FULLY_MASKED: 1}


def test_build_dataset_reports_counts(tokenizer, alpaca_file: Path) -> None:
    ds, report = build_dataset([str(alpaca_file)], DataArgs(), tokenizer)
    assert len(ds) == report.examples == 8
    assert describe_example(tokenizer, ds[0]).endswith("[[Hello!<|im_end|>\n]]")


def test_template_whose_turn_does_not_continue_its_prompt_fails_loudly(tokenizer) -> None:
    # The generation prompt says "assistant: " but a rendered answer opens with "bot: ": no exact labels possible.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ ('bot' if m['role'] == 'assistant' else m['role']) + ': ' + m['content'] + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match=r"f.json: record 3: chat template does not render turns incrementally: "
                                        r"render\(messages\[:2\]"):
        encode_messages(tokenizer, MESSAGES, 1024, ("f.json", 3))


def test_template_leaving_end_of_turn_unsupervised_warns(tokenizer, alpaca_file: Path, caplog) -> None:
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}assistant:\n{% endif %}"
    from peftkit.data import prepare_data

    with caplog.at_level(logging.WARNING, logger="peftkit"):
        prepare_data(DataArgs(train=str(alpaca_file)), tokenizer)
    assert "leaves the end-of-turn token outside the labels" in caplog.text


@pytest.mark.parametrize("name", SHIPPED_TEMPLATES)
def test_shipped_templates_label_exactly(tokenizer, name: str) -> None:
    apply_template(tokenizer, name)
    example, _ = encode_messages(tokenizer, MESSAGES, 1024, ("f", 0))
    assert example["input_ids"] == _ids(tokenizer, MESSAGES)
    assert example["labels"] == expected_labels(tokenizer, MESSAGES, [2, 4])


def test_unknown_template_name(tokenizer) -> None:
    with pytest.raises(ConfigError, match="data.template='vicuna': neither a shipped template"):
        apply_template(tokenizer, "vicuna")


def test_template_from_a_jinja_file(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    apply_template(tokenizer, str(path))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "a|"
