"""The tokenized-data cache: a hit only when nothing that shapes the examples changed; atomic; `peftkit data`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import peftkit.data.dataset as dataset_module
from peftkit.cli import main
from peftkit.config.load import dataset_specs
from peftkit.config.schema import DataArgs
from peftkit.data import cache, prepare_data
from tests.conftest import write_config


def _key(args: DataArgs, tokenizer) -> str:
    return cache.fingerprint(dataset_specs(args, "train")[0], dataset_specs(args, "eval")[0], args, tokenizer)


def test_second_run_reads_the_cache_without_tokenizing(tokenizer, alpaca_file: Path, monkeypatch) -> None:
    args = DataArgs(train=str(alpaca_file), packing=True, cutoff_len=64)
    first = prepare_data(args, tokenizer)
    monkeypatch.setattr(dataset_module, "encode_dataset", lambda *a, **k: pytest.fail("tokenized again"))
    second = prepare_data(args, tokenizer)
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.report.as_dict() == first.report.as_dict()
    monkeypatch.undo()
    rebuilt = prepare_data(DataArgs(train=str(alpaca_file), packing=True, cutoff_len=64, overwrite_cache=True), tokenizer)
    assert rebuilt.train["input_ids"] == first.train["input_ids"]


def test_any_change_that_shapes_examples_is_a_new_key(tokenizer, alpaca_file: Path) -> None:
    args = DataArgs(train=str(alpaca_file))
    base = _key(args, tokenizer)
    assert _key(DataArgs(train=str(alpaca_file), preprocessing_num_workers=2), tokenizer) == base  # speed only
    for changed in (DataArgs(train=str(alpaca_file), mask="last"), DataArgs(train=str(alpaca_file), cutoff_len=7),
                    DataArgs(train=str(alpaca_file), packing=True), DataArgs(train=str(alpaca_file), max_samples=3),
                    DataArgs(train=[{"path": str(alpaca_file), "columns": {"output": "input"}}])):
        assert _key(changed, tokenizer) != base, changed
    records = json.loads(alpaca_file.read_text())
    records[0]["output"] = "Hello there!"
    alpaca_file.write_text(json.dumps(records))  # same path, new content
    assert _key(args, tokenizer) != base
    edited = _key(args, tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert _key(args, tokenizer) != edited


def test_incomplete_cache_folder_is_never_used(tokenizer, alpaca_file: Path) -> None:
    args = DataArgs(train=str(alpaca_file))
    key = _key(args, tokenizer)
    prepare_data(args, tokenizer)
    (cache.cache_dir(key) / ".peftkit_complete").unlink()  # as if killed while writing
    assert cache.load_cache(key) is None
    prepare_data(args, tokenizer)
    assert cache.load_cache(key) is not None
    assert [p.name for p in cache.cache_dir(key).parent.iterdir()] == [key]  # no temporary folders left


def test_peftkit_data_shows_report_and_examples(tmp_path: Path, tokenizer_dir: Path, alpaca_file: Path, capsys) -> None:
    config = write_config(tmp_path, f"""
model: {tokenizer_dir}
data: {{train: {alpaca_file}, packing: true, cutoff_len: 64}}
train: {{output_dir: {tmp_path / 'out'}}}
""")
    assert main(["data", str(config), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{alpaca_file} (alpaca): 8 records -> 8 examples, 0 truncated" in out
    assert "packing: " in out and "efficiency" in out
    assert out.count("--- example") == 2 and "[[" in out
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_peftkit_data_bad_record_exits_2(tmp_path: Path, tokenizer_dir: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 5}\n')
    config = write_config(tmp_path, f"model: {tokenizer_dir}\ndata: {{train: {bad}}}\ntrain: {{output_dir: {tmp_path}/o}}\n")
    assert main(["data", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 2, field 'output': must be a string, got a number" in err


def test_worker_processes_tokenize_identically(tokenizer, alpaca_file: Path) -> None:
    one = prepare_data(DataArgs(train=str(alpaca_file)), tokenizer)
    two = prepare_data(DataArgs(train=str(alpaca_file), preprocessing_num_workers=2, overwrite_cache=True), tokenizer)
    assert two.train["input_ids"] == one.train["input_ids"] and two.train["labels"] == one.train["labels"]
