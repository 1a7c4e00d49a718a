"""The gpu tier: what only a CUDA device can show. Skipped, with that reason, where there is none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.config import load_config
from peftkit.train.run import train
from tests.helpers import tiny_run


@pytest.mark.parametrize("speedups", ["auto", "off"])
def test_bf16_lora_training_on_cuda_logs_finite_losses_and_counts(speedups: str, tiny_model_dir: Path,
                                                                  alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / speedups
    result = train(load_config(None, tiny_run(tiny_model_dir, out, "train.bf16=true", "data.packing=true",
                                              f"train.peftkit_speedups={speedups}", data=alpaca_file, max_steps=3)))
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    logs = [r for r in rows if r["event"] == "log"]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert all(r["real_tokens_seen"] >= r["supervised_tokens_seen"] > 0 for r in logs)
    assert next(result.model.parameters()).device.type == "cuda"


def test_speedups_change_the_first_loss_by_rounding_only(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    first = {}
    for speedups in ("auto", "off"):
        out = tmp_path / speedups
        train(load_config(None, tiny_run(tiny_model_dir, out, "train.bf16=true", f"train.peftkit_speedups={speedups}",
                                         data=alpaca_file, max_steps=1, seed=0)))
        rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        first[speedups] = next(r["loss"] for r in rows if r["event"] == "log")
    assert first["auto"] == pytest.approx(first["off"], rel=1e-2)  # bf16 rounding, not a different loss
