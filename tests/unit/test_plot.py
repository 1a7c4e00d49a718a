"""`peftkit plot`: redraws training_loss.png from trainer_log.jsonl, skipping half-written lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.cli import main
from peftkit.train.logfile import read_log
from peftkit.train.plot import smooth


def test_plot_from_a_log_being_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lines = [json.dumps({"event": "log", "current_steps": i, "loss": 2.0 / i}) for i in range(1, 6)]
    lines.append(json.dumps({"event": "eval", "current_steps": 5, "eval_loss": 0.5}))
    (tmp_path / "trainer_log.jsonl").write_text("\n".join(lines) + '\n{"event": "log", "curr')  # torn last line
    assert len(read_log(tmp_path)) == 6
    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "training_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and capsys.readouterr().out.strip() == str(png)


def test_plot_without_a_log_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    assert "has no loss yet" in capsys.readouterr().err


def test_smoothing_is_bias_corrected() -> None:
    assert smooth([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])
    # EMA 0.5 -> 1.75 after two steps, divided by the bias correction 1 - 0.5**2
    assert smooth([1.0, 3.0], weight=0.5) == pytest.approx([1.0, 1.75 / 0.75])
