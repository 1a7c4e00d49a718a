"""PeftTrainer saving per finetuning_type, reload in plain transformers / peft, best-model restore, LogCallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.config import load_config
from peftkit.train.run import train
from tests.helpers import tiny_run

LOG_FIELDS = {"current_steps", "total_steps", "loss", "reward", "learning_rate", "epoch", "percentage",
              "elapsed_time", "remaining_time", "event", "eval_loss", "grad_norm"}


def _config(tiny_model_dir: Path, alpaca_file: Path, out: Path, *extra: str):
    return load_config(None, tiny_run(tiny_model_dir, out, *extra, data=alpaca_file, max_steps=4, seed=0))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("ft", ["lora", "freeze", "full"])
def test_saved_folder_reloads_with_equal_logits(ft: str, tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, alpaca_file, out, f"finetuning.finetuning_type={ft}",
                  "finetuning.freeze_trainable_layers=1")
    result = train(cfg)
    expected = {"config.yaml", "trainer_log.jsonl", "training_loss.png", "training_args.json",
                "finetuning_args.json", "tokenizer.json", "tokenizer_config.json", "data_report.json"}
    names = {p.name for p in out.iterdir()}
    assert expected <= names
    assert json.loads((out / "finetuning_args.json").read_text())["finetuning_type"] == ft
    assert json.loads((out / "training_args.json").read_text())["max_steps"] == 4
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if ft == "lora":
        from peft import AutoPeftModelForCausalLM

        assert {"adapter_model.safetensors", "adapter_config.json"} <= names and "model.safetensors" not in names
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
        reloaded = AutoPeftModelForCausalLM.from_pretrained(out)  # plain peft, no peftkit code
    else:
        assert "model.safetensors" in names and "adapter_model.safetensors" not in names
        reloaded = AutoModelForCausalLM.from_pretrained(out)
    trained = result.model
    torch.testing.assert_close(_logits(reloaded, ids), _logits(trained, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(reloaded, ids), _logits(base, ids), atol=1e-3)  # training changed it
    AutoTokenizer.from_pretrained(out)


def test_freeze_trains_only_the_last_layers(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(_config(tiny_model_dir, alpaca_file, out, "finetuning.finetuning_type=freeze", "finetuning.freeze_trainable_layers=1"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    saved = load_file(out / "model.safetensors")
    changed = {name for name, w in saved.items() if not torch.equal(w, base[name])}
    assert changed and all(".layers.1." in name for name in changed)


@pytest.mark.parametrize("ft", ["lora", "freeze", "full"])
def test_load_best_model_restores_the_best_checkpoint(ft: str, tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    # Eval on the training data while the loss falls, with greater_is_better=true: the *first*
    # checkpoint is "best", so a restore that kept the last weights would be caught.
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, alpaca_file, out, f"finetuning.finetuning_type={ft}", f"data.eval={alpaca_file}",
                  "train.eval_strategy=steps", "train.eval_steps=2", "train.save_strategy=steps", "train.save_steps=2",
                  "train.load_best_model_at_end=true", "train.metric_for_best_model=eval_loss",
                  "train.greater_is_better=true")
    train(cfg)
    state = json.loads((out / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-2"
    weights = "adapter_model.safetensors" if ft == "lora" else "model.safetensors"
    best, last = load_file(out / "checkpoint-2" / weights), load_file(out / "checkpoint-4" / weights)
    final = load_file(out / weights)  # what was saved after training: the restored model
    for name, w in best.items():
        assert torch.equal(final[name], w), name
    assert any(not torch.equal(last[n], best[n]) for n in best)
    evals = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in evals if r["event"] == "eval"] == [2, 4]
    assert all(r["eval_loss"] > 0 for r in evals if r["event"] == "eval")


def test_trainer_log_lines(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "trainer_log.jsonl").write_text('{"stale": true}\n')
    train(_config(tiny_model_dir, alpaca_file, out))
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert "stale" not in rows[0]  # a fresh run starts a fresh log
    logs = [r for r in rows if r["event"] == "log"]
    assert [r["current_steps"] for r in logs] == [1, 2, 3, 4]
    for r in rows:
        assert LOG_FIELDS <= set(r)
        assert r["total_steps"] == 4 and r["reward"] is None
        assert isinstance(r["elapsed_time"], str) and isinstance(r["percentage"], float)
    for r in logs:
        assert isinstance(r["loss"], float) and isinstance(r["learning_rate"], float) and isinstance(r["epoch"], float)
    assert logs[-1]["percentage"] == 100.0 and logs[-1]["remaining_time"] == "0:00:00"
    assert rows[-1]["event"] == "train_end"
