"""PeftTrainer saving per finetuning_type, reload in plain transformers / peft, best-model restore, LogCallback."""

from __future__ import annotations

import json
import shutil
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


class _Clock:
    """A fake clock for TimeBudget: each reading is `step` seconds after the previous one."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_time_budget_fits_the_steps_and_the_schedule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The step count comes from the measured rate, and the learning rates are exactly those of a run
    configured with that max_steps from the start (calibration ends inside the warmup)."""
    from transformers import Seq2SeqTrainingArguments, TrainerControl, TrainerState, get_scheduler

    from peftkit.train.callbacks import TimeBudget

    monkeypatch.setattr(TimeBudget, "clock", staticmethod(_Clock(10.0)))  # 10 s between the callback's readings

    def lrs(max_steps: int, budget: TimeBudget | None) -> list[float]:
        args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, warmup_steps=8,
                                        lr_scheduler_type="cosine", learning_rate=1e-3, report_to="none")
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=args.learning_rate)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=8, num_training_steps=max_steps)
        state, control, seen = TrainerState(max_steps=max_steps), TrainerControl(), []
        if budget:
            budget.on_train_begin(args, state, control, lr_scheduler=scheduler)
        while state.global_step < state.max_steps and not control.should_training_stop:
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            state.global_step += 1
            if budget:
                budget.on_step_end(args, state, control, lr_scheduler=scheduler)
        return seen

    budget = TimeBudget(minutes=2.0)
    fitted = lrs(1000, budget)
    # readings at train begin (10 s), end of step 1 (20 s) and of step 6 (30 s): 2 s a step, 100 s left: 50 more
    assert budget.chosen_steps == 56 and len(fitted) == 56
    assert fitted == lrs(56, None)
    assert TimeBudget.from_state(budget.state()).chosen_steps == 56  # what a checkpoint keeps

    short = TimeBudget(minutes=0.2)  # 12 s: the time is spent by the end of calibration, so it stops there
    assert len(lrs(1000, short)) == 6 and short.chosen_steps == 6
    capped = TimeBudget(minutes=600.0)  # max_steps stays the upper bound
    assert len(lrs(40, capped)) == 40 and capped.chosen_steps == 40


def test_time_budget_in_a_run_and_its_resume(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path,
                                             alpaca_file: Path, tmp_path: Path) -> None:
    """train.max_train_minutes through PeftTrainer: the log's total is the chosen count, and a resumed run keeps
    the choice (the checkpoint holds it) instead of measuring again."""
    from peftkit.train.callbacks import TimeBudget

    monkeypatch.setattr(TimeBudget, "clock", staticmethod(_Clock(10.0)))
    out = tmp_path / "run"
    args = tiny_run(tiny_model_dir, out, "train.max_train_minutes=0.5", "train.save_strategy=steps",
                    "train.save_steps=8", "train.warmup_steps=8", data=alpaca_file, max_steps=200, seed=0)
    train(load_config(None, args))
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "train_end" and rows[-1]["current_steps"] == 11 and rows[-1]["total_steps"] == 11
    assert rows[-1]["status"] == "finished"
    lr = {r["current_steps"]: r["learning_rate"] for r in rows if r["event"] == "log"}
    # readings 10, 20, 30 s: 2 s a step, 10 s left, 5 more steps. transformers' default linear decay, warmup 8,
    # ending at step 11 (not 200): the rate logged at step s is the one it ran with, (12 - s) / 3 of the peak
    assert [lr[s] for s in (9, 10, 11)] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3], rel=1e-9)

    monkeypatch.setattr(TimeBudget, "clock", staticmethod(_Clock(1000.0)))  # a resume that measured would stop at once
    shutil.rmtree(out / "checkpoint-11", ignore_errors=True)  # a save at the last step, where there is one
    train(load_config(None, [*args, "train.resume_from_checkpoint=true"]))
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r for r in rows if r["event"] == "train_begin"][-1]["resumed_from"].endswith("checkpoint-8")
    assert rows[-1]["current_steps"] == 11 and rows[-1]["total_steps"] == 11
    lr2 = {r["current_steps"]: r["learning_rate"] for r in rows if r["event"] == "log"}
    assert [lr2[s] for s in (9, 10, 11)] == pytest.approx([lr[s] for s in (9, 10, 11)], rel=1e-9, abs=1e-12)
