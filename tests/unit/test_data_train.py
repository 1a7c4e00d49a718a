"""Every format, packing and val_size train through `peftkit train` on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from peftkit.cli import main
from tests.helpers import REPO

FORMATS = {
    "alpaca": ("data/demo/alpaca_en_demo.json", []),
    "sharegpt": ("data/demo/glaive_toolcall_en_demo.json", ["data.template=chatml"]),  # a template that shows tools
    "preference": ("data/demo/dpo_en_demo.json", []),
    "text": ("data/demo/wiki_demo.txt", []),
    "pairs": ("data/mrpc/train.tsv", ['data.columns={text: "#1 String", text_pair: "#2 String", label: Quality}']),
}


def _train(tiny_model_dir: Path, out: Path, *overrides: str) -> int:
    config = out.parent / "config.yaml"
    config.write_text(f"model: {tiny_model_dir}\n")
    return main([
        "train", str(config), f"train.output_dir={out}", "data.cutoff_len=128",
        "data.max_samples=8", "train.max_steps=2", "train.per_device_train_batch_size=2", "train.logging_steps=1",
        "train.disable_tqdm=true", *overrides,
    ])


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains(fmt: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    path, extra = FORMATS[fmt]
    out = tmp_path / "run"
    assert _train(tiny_model_dir, out, f"data.train={REPO / path}", f"data.format={fmt}", *extra) == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["records"] == 8 and report["examples"] >= 8 and report["supervised_tokens"] > 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert math.isfinite(summary["train_loss"])


def test_packing_and_val_size_train_and_evaluate(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = _train(tiny_model_dir, out, f"data.train={REPO / 'data/demo/alpaca_en_demo.json'}", "data.max_samples=40",
                  "data.cutoff_len=512", "data.packing=true", "data.val_size=8", "train.eval_strategy=steps",
                  "train.eval_steps=2")
    assert code == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["eval_examples"] == 8 and report["examples"] == 32
    assert report["packing"]["rows"] < 32 and report["packing"]["efficiency"] > 0.8
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any(line.get("event") == "eval" and math.isfinite(line["eval_loss"]) for line in lines)


def test_streaming_with_packing_trains_for_max_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = _train(tiny_model_dir, out, f"data.train={REPO / 'data/demo/alpaca_en_demo.json'}", "data.max_samples=40",
                  "data.streaming=true", "data.packing=true", "data.cutoff_len=256", "train.max_steps=3")
    assert code == 0
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in rows if r["event"] == "log"] == [1, 2, 3]
    assert json.loads((out / "data_report.json").read_text())["streaming"] is True
