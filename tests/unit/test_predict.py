"""Batch prediction and eval loss on the tiny model, through `peftkit eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from peftkit.cli import main
from peftkit.config import load_config
from peftkit.config.schema import DataArgs
from peftkit.data import build_dataset
from peftkit.eval.loss import eval_loss
from peftkit.infer.chat import load_for_chat


def test_eval_loss_is_token_weighted_and_matches_transformers(tiny_model_dir: Path, alpaca_file: Path) -> None:
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"eval.dataset={alpaca_file}", "train.output_dir=x",
                             "eval.batch_size=3"])
    model, tok = load_for_chat(str(tiny_model_dir), None)
    result = eval_loss(model, tok, cfg)
    ds, _ = build_dataset([str(alpaca_file)], DataArgs(), tok)
    total = count = 0
    with torch.no_grad():  # one record at a time: transformers' mean loss times its supervised tokens
        for row in ds:
            n = sum(label != -100 for label in row["labels"][1:])
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
            total, count = total + float(out.loss) * n, count + n
    assert result["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_peftkit_eval_writes_predictions_and_results(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = main(["eval", str(_write_config(tmp_path)), f"model.name_or_path={tiny_model_dir}",
                 f"eval.dataset={alpaca_file}", f"train.output_dir={out}", "eval.max_samples=5",
                 "eval.metrics=[exact_match, rouge, bleu, loss]", "generate.max_new_tokens=4", "eval.batch_size=2"])
    assert code == 0
    out = out / "eval" / alpaca_file.stem  # its own folder per dataset, never over a run's files
    results = json.loads((out / "predict_results.json").read_text())
    assert {"exact_match", "rouge-1", "rouge-l", "bleu", "eval_loss", "perplexity", "records_per_second",
            "generated_tokens_per_second"} <= set(results)
    assert results["records"] == 5
    lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 5 and set(lines[0]) == {"prompt", "predict", "label"}
    assert lines[2]["label"] == '{"姓名": ["高勇"], "国籍": ["中国国籍"]}'  # file order kept, UTF-8 unescaped
    assert "高勇" in (out / "generated_predictions.jsonl").read_text(encoding="utf-8")
    assert json.loads(capsys.readouterr().out)["records"] == 5


def _write_config(tmp_path: Path) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text("data:\n  format: alpaca\n")
    return path


def test_unknown_metric_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(_write_config(tmp_path)), "train.output_dir=x", "eval.metrics=[bleu, meteor]"]) == 2
    assert "eval.metrics: unknown metric 'meteor'" in capsys.readouterr().err


def test_peftkit_eval_scores_tool_calls_with_the_tools_in_the_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    heldout = Path(__file__).resolve().parents[2] / "data/demo/glaive_toolcall_heldout.json"
    out = tmp_path / "out"
    config = tmp_path / "eval.yaml"
    config.write_text("data: {format: sharegpt, template: chatml}\n")
    assert main(["eval", str(config), f"model.name_or_path={tiny_model_dir}", f"eval.dataset={heldout}",
                 f"train.output_dir={out}", "eval.max_samples=4", "eval.metrics=[tool_call]",
                 "generate.max_new_tokens=4"]) == 0
    out = out / "eval" / heldout.stem
    results = json.loads((out / "predict_results.json").read_text())
    calls = [r for r in json.loads(heldout.read_text())[:4] if r["conversations"][-1]["from"] == "function_call"]
    assert results["tool_call_records"] == len(calls) > 0
    assert results["tool_name_accuracy"] == 0.0  # a random model with 4 tokens calls nothing
    lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    has_tools = [bool(json.loads(r.get("tools") or "[]")) for r in json.loads(heldout.read_text())[:4]]
    assert ["<tools>" in line["prompt"] for line in lines] == has_tools and any(has_tools)  # rendered by the template
    first_call = next(line["label"] for line in lines if line["label"].startswith("[{"))
    assert json.loads(first_call)[0]["name"] == json.loads(calls[0]["conversations"][-1]["value"])["name"]
