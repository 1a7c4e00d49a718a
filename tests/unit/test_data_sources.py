"""Sources and formats: every file type and record format, column mapping, bad records named precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.config import load_config
from peftkit.config.schema import DataArgs, DatasetSpec
from peftkit.data.dataset import build_dataset, iter_samples, prepare_data
from peftkit.data.formats import Where, alpaca, pairs, preference, sharegpt
from peftkit.errors import ConfigError, DataError
from tests.helpers import REPO

AT = Where("f.json", "record 0")


def _samples(path: Path, **kwargs) -> list[dict]:
    args = DataArgs(**{k: v for k, v in kwargs.items() if k in DataArgs.__dataclass_fields__})
    spec = DatasetSpec(path=str(path), format=kwargs.get("format", "alpaca"), columns=kwargs.get("columns"),
                       tags=kwargs.get("tags"), max_samples=kwargs.get("max_samples"))
    return [s for s, _ in iter_samples(spec, args)]


def test_alpaca_to_messages_with_system_and_history() -> None:
    record = {"system": "S", "history": [["q1", "a1"]], "instruction": "do", "input": "this", "output": "done"}
    assert alpaca(record, AT)["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "do\nthis"},
        {"role": "assistant", "content": "done"},
    ]


def test_sharegpt_with_tool_roles_and_openai_messages() -> None:
    record = {"system": "S", "conversations": [
        {"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{\"name\": \"w\"}"},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}]}
    messages = sharegpt(record, AT)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"] == [{"type": "function", "function": {"name": "w", "arguments": {}}}]
    glaive = json.loads((REPO / "data/demo/glaive_toolcall_en_demo.json").read_text())[0]
    sample = sharegpt(glaive, AT)  # the tools stay structured, for the chat template to render
    assert sample["tools"][0]["function"]["name"] == json.loads(glaive["tools"])[0]["name"]
    assert sample["messages"][0]["role"] == "user"
    openai = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "train": False},
                           {"role": "user", "content": "again"}, {"role": "assistant", "content": "yo!"}]}
    assert sharegpt(openai, AT)["messages"][1] == {"role": "assistant", "content": "yo", "train": False}


def test_sharegpt_custom_role_tags() -> None:
    record = {"conversations": [{"speaker": "Q", "text": "hi"}, {"speaker": "A", "text": "hello"}]}
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "Q", "assistant_tag": "A"}
    assert sharegpt(record, AT, tags)["messages"] == [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]


def test_preference_in_the_demo_shape_and_alpaca_shape() -> None:
    records = json.loads((REPO / "data/demo/dpo_en_demo.json").read_text())
    sample = preference(records[0], AT)
    assert sample["messages"][-1]["role"] == "user"
    assert sample["chosen"]["role"] == sample["rejected"]["role"] == "assistant"
    assert sample["chosen"]["content"] == records[0]["chosen"]["value"]
    flat = preference({"instruction": "q", "chosen": "good", "rejected": "bad"}, AT)
    assert flat == {"messages": [{"role": "user", "content": "q"}],
                    "chosen": {"role": "assistant", "content": "good"},
                    "rejected": {"role": "assistant", "content": "bad"}}


def test_mrpc_tsv_as_pairs_with_column_mapping() -> None:
    columns = {"text": "#1 String", "text_pair": "#2 String", "label": "Quality"}
    samples = _samples(REPO / "data/mrpc/dev.tsv", format="pairs", columns=columns, max_samples=3)
    assert len(samples) == 3
    assert samples[0]["label"] in (0, 1) and samples[0]["text"] and samples[0]["text_pair"]
    assert pairs({"text": "a", "label": "yes"}, AT) == {"text": "a", "text_pair": None, "label": "yes"}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_file_type_reads_the_same_records(tmp_path: Path, suffix: str) -> None:
    import pandas as pd

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(map(json.dumps, rows)))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    assert [s["messages"][-1]["content"] for s in _samples(path)] == ["a0", "a1", "a2"]


def test_txt_documents_per_line_or_per_file_and_folders(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "docs/b.txt").write_text("third doc\n")
    assert [s["text"] for s in _samples(tmp_path / "docs", format="text")] == ["first doc", "second doc", "third doc"]
    per_file = _samples(tmp_path / "docs", format="text", txt_document="file")
    assert [s["text"] for s in per_file] == ["first doc\n\nsecond doc\n", "third doc\n"]


def test_hub_name_fails_clearly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # this machine has no hub: fail at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"nobody/nothing: is not a local file or folder, and reading it as a hub"):
        _samples(Path("nobody/nothing"))


@pytest.mark.parametrize(
    ("format", "content", "message"),
    [
        ("alpaca", '[{"instruction": "hi"}]', "record 0, field 'output': must be a string, it is missing"),
        ("alpaca", '[{"instruction": "hi", "output": 3}]', "record 0, field 'output': must be a string, got a number"),
        ("alpaca", '[{"instruction": "hi", "output": "a", "history": [["q"]]}]',
         "field 'history[0]': must be a [query, answer] pair"),
        ("alpaca", '{"instruction": "hi"}', "a .json data file must hold a list of records"),
        ("alpaca", '[{"instruction": "hi",', "not valid JSON"),
        ("sharegpt", '[{"conversations": [{"from": "gpt", "value": "a"}]}]',
         "field 'conversations[0]': out of role order: found 'assistant' where user or tool should be"),
        ("sharegpt", '[{"conversations": [{"from": "bot", "value": "a"}]}]',
         "field 'conversations[0].from': unknown role 'bot'; allowed: human, gpt, system, observation, function_call"),
        ("sharegpt", '[{"conversations": [{"from": "human", "value": "q"}]}]',
         "field 'conversations': must end with the assistant's answer"),
        ("preference", '[{"prompt": "q", "chosen": "a", "rejected": ""}]', "field 'rejected': must be a non-empty"),
        ("pairs", '[{"text": "q", "label": null}]', "field 'label': must be an integer class or a class name"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path: Path, tokenizer, format: str, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        build_dataset([str(path)], DataArgs(format=format), tokenizer)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_jsonl_error_names_the_line(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not valid JSON"):
        build_dataset([str(path)], DataArgs(), tokenizer)


def test_skip_bad_records_counts_each_reason_with_its_first_location(tmp_path: Path, tokenizer, caplog) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = ['{"instruction": "a", "output": "b"}', "{oops", '{"instruction": "c"}', '{"instruction": "d"}',
             '{"instruction": "e", "output": "f"}']
    path.write_text("\n".join(lines) + "\n")
    ds, report = build_dataset([str(path)], DataArgs(on_bad_record="skip"), tokenizer)
    assert len(ds) == 2 and report.records == 5
    drops = report.datasets[0].drops.reasons
    assert drops["bad record: output: must be a string, it is missing"] == {"count": 2, "first": f"{path}: line 3"}
    assert sum(e["count"] for e in drops.values()) == 3
    assert "dropped 2: bad record: output: must be a string" in report.summary()


def test_several_datasets_with_own_formats_caps_and_interleaving(tmp_path: Path, tokenizer, alpaca_file: Path) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"u{i}"},
                                                        {"role": "assistant", "content": f"a{i}"}]}) for i in range(6)))
    specs = [str(alpaca_file), {"path": str(chat), "format": "messages", "max_samples": 4}]
    concat = prepare_data(DataArgs(train=specs), tokenizer)
    assert [d.records for d in concat.report.datasets] == [8, 4] and len(concat.train) == 12
    inter = prepare_data(DataArgs(train=specs, mix_strategy="interleave_under", interleave_probs=[0.5, 0.5]), tokenizer)
    assert len(inter.train) < 12  # stops when the first dataset runs out
    split = prepare_data(DataArgs(train=specs, val_size=0.25), tokenizer)
    assert (len(split.train), len(split.eval)) == (9, 3)
    again = prepare_data(DataArgs(train=specs, val_size=0.25, overwrite_cache=True), tokenizer)
    assert again.eval["input_ids"] == split.eval["input_ids"]  # the seed fixes the split


def test_config_rejects_bad_dataset_specs(tmp_path: Path, alpaca_file: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
data:
  train: [{{path: {alpaca_file}, fromat: alpaca}}, {{path: {alpaca_file}, format: csv}}, missing.json]
  mix_strategy: interleave_under
  interleave_probs: [0.5, 0.6]
train: {{output_dir: {tmp_path}/out}}
""")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    text = str(e.value)
    assert "data.train[0].fromat: unknown key; did you mean format?" in text
    assert "data.train[1].format='csv': must be one of alpaca, sharegpt" in text
    assert "data.train[2]: 'missing.json' does not exist" in text
    assert "data.interleave_probs=[0.5, 0.6]: needs one probability per training dataset (3), summing to 1" in text


def test_streaming_skip_reports_what_it_left_out(tmp_path: Path, tokenizer, caplog) -> None:
    import logging

    path = tmp_path / "mixed.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n{"instruction": "c", "output": "d"}\n')
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        data = prepare_data(DataArgs(train=str(path), streaming=True, on_bad_record="skip"), tokenizer)
        assert len(list(data.train)) == 2
    assert ("dropped 1: bad record: not valid JSON (column 2): Expecting property name enclosed in double quotes "
            f"(first: {path}: line 2)") in caplog.text
