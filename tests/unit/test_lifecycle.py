"""Training lifecycle: kills, SIGTERM, resume equal to an uninterrupted run, log truth, NaN, early stopping."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.config import load_config
from peftkit.errors import PeftkitError
from peftkit.train.run import train
from tests.helpers import ASSETS, REPO, tiny_run


def _overrides(tiny_model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_run(tiny_model_dir, out, "train.save_strategy=steps", "train.save_steps=2", *extra, data=data,
                    max_steps=6, batch_size=2, seed=0)


def _run(fault: str, config: Path, overrides: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFTKIT_HOME": str(home)}
    return subprocess.run([sys.executable, str(ASSETS / "fault_train.py"), fault, str(config), *overrides],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO, check=False)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("finetuning: {finetuning_type: lora}\n")
    return path


@pytest.mark.slow
def test_killed_twice_then_resumed_equals_an_uninterrupted_run(tiny_model_dir, alpaca_file, tmp_path, config) -> None:
    reference = tmp_path / "reference"
    train(load_config(None, _overrides(tiny_model_dir, alpaca_file, reference)))
    out = tmp_path / "run"
    args = _overrides(tiny_model_dir, alpaca_file, out)
    home = tmp_path / "home"

    first = _run("kill_in_step:4", config, args, home)  # after checkpoint-2, during step 4
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert [r["current_steps"] for r in _rows(out) if r["event"] == "log"] == [1, 2, 3]
    second = _run("kill_in_save:4", config, [*args, "train.resume_from_checkpoint=true"], home)
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4/.peftkit_complete").exists()
    third = _run("none", config, [*args, "train.resume_from_checkpoint=true"], home)
    assert third.returncode == 0, third.stderr
    assert "removing" in third.stderr and "checkpoint-4" in third.stderr  # the half-written one

    expected = _adapter(reference)
    for name, weight in _adapter(out).items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6, msg=name)
    rows = _rows(out)
    assert [r["current_steps"] for r in rows if r["event"] == "log"] == [1, 2, 3, 4, 5, 6]  # each step once
    begins = [r for r in rows if r["event"] == "train_begin"]
    assert [b["current_steps"] for b in begins] == [0, 2, 2]
    assert begins[-1]["resumed_from"] == str(out / "checkpoint-2")
    ref_rows = [r for r in _rows(reference) if r["event"] == "log"]
    for mine, ref in zip([r for r in rows if r["event"] == "log"], ref_rows):
        assert mine["loss"] == pytest.approx(ref["loss"], abs=1e-6)
        assert mine["supervised_tokens_seen"] == ref["supervised_tokens_seen"]  # counts survive the kills
    resumed = [r for r in rows if r["event"] == "log" and r["current_steps"] > 2]
    assert all(r["elapsed_seconds"] < 60 for r in resumed)  # this process's time only, not since step 0
    assert rows[-1]["event"] == "train_end" and rows[-1]["status"] == "finished"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_model_dir, alpaca_file, tmp_path, config) -> None:
    out = tmp_path / "run"
    args = _overrides(tiny_model_dir, alpaca_file, out, "train.save_strategy=no")
    stopped = _run("term_in_step:3", config, args, tmp_path / "home")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    hint = stopped.stderr.split("Resume with: ")[1].splitlines()[0]
    assert shlex.split(hint) == ["peftkit", "train", str(config), *args, "train.resume_from_checkpoint=true"]
    assert (out / "checkpoint-3/.peftkit_complete").is_file()
    assert _rows(out)[-1]["event"] == "train_end" and _rows(out)[-1]["status"] == "interrupted"
    resumed = _run("none", shlex.split(hint)[2], shlex.split(hint)[3:], tmp_path / "home")  # the hint, run literally
    assert resumed.returncode == 0, resumed.stderr
    assert [r["current_steps"] for r in _rows(out) if r["event"] == "log"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tiny_model_dir, alpaca_file, tmp_path, config) -> None:
    out = tmp_path / "run"
    proc = _run("nan_at:3", config, _overrides(tiny_model_dir, alpaca_file, out), tmp_path / "home")
    assert proc.returncode == 2
    assert f"the loss is nan at step 3: training stopped. The last good checkpoint is {out / 'checkpoint-2'}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _rows(out)[-1]["event"] == "error" and "step 3" in _rows(out)[-1]["message"]


def test_fresh_run_into_checkpoints_is_refused_unless_asked(tiny_model_dir, alpaca_file, tmp_path) -> None:
    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny_model_dir, alpaca_file, out, "train.max_steps=2")))
    with pytest.raises(PeftkitError, match=r"already holds checkpoints \(checkpoint-2\). Resume with"):
        train(load_config(None, _overrides(tiny_model_dir, alpaca_file, out, "train.max_steps=2")))
    train(load_config(None, _overrides(tiny_model_dir, alpaca_file, out, "train.max_steps=2",
                                       "train.overwrite_output_dir=true")))
    assert [r["event"] for r in _rows(out)][0] == "train_begin"
    assert sum(r["event"] == "train_begin" for r in _rows(out)) == 1  # the old log went with the old checkpoints
    with pytest.raises(PeftkitError, match="not a complete peftkit checkpoint"):
        train(load_config(None, _overrides(tiny_model_dir, alpaca_file, out, f"train.resume_from_checkpoint={out}")))


def test_eval_token_accuracy_and_early_stopping(tiny_model_dir, alpaca_file, tmp_path) -> None:
    out = tmp_path / "run"
    # greater_is_better on eval_loss: a falling loss is "worse", so patience 1 stops after the second eval
    train(load_config(None, _overrides(
        tiny_model_dir, alpaca_file, out, "train.max_steps=20", "data.val_size=2", "train.eval_strategy=steps",
        "train.eval_steps=1", "train.save_steps=1", "train.early_stopping_patience=1", "train.greater_is_better=true",
        "train.load_best_model_at_end=true")))
    rows = _rows(out)
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["current_steps"] for r in evals] == [1, 2]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and r["eval_loss"] > 0 for r in evals)
    assert rows[-1]["event"] == "train_end" and rows[-1]["status"] == "stopped_early"
    logs = [r for r in rows if r["event"] == "log"]
    assert all(r["tokens_seen"] >= r["real_tokens_seen"] >= r["supervised_tokens_seen"] > 0 for r in logs)
    assert all(r["tokens_per_second"] > 0 and r["peak_memory_mb"] > 0 for r in logs)


def test_report_to_tensorboard_writes_event_files(tiny_model_dir, alpaca_file, tmp_path) -> None:
    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny_model_dir, alpaca_file, out, "train.max_steps=2", "train.save_strategy=no",
                                       "train.report_to=tensorboard")))
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_first_ctrl_c_asks_for_a_stop_and_the_second_aborts() -> None:
    from types import SimpleNamespace

    from peftkit.train.signals import GracefulStop

    before = signal.getsignal(signal.SIGINT)  # the default handler; SIG_IGN when launched in the background
    with GracefulStop() as stop:
        assert not stop.agreed(SimpleNamespace(world_size=1))
        os.kill(os.getpid(), signal.SIGINT)  # handled: no KeyboardInterrupt
        assert stop.agreed(SimpleNamespace(world_size=1)) and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
