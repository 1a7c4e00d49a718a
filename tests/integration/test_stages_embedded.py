"""Each stage's example config, run small on real data: the before / after figure moves the right way.

Budgets are cut (steps, records) so the four runs take a few minutes on a 2-core CPU; the full
examples are what the notes report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.cli import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _run(example: str, out: Path, *overrides: str) -> dict:
    code = main(["train", str(REPO / "examples" / example), f"train.output_dir={out}", "train.disable_tqdm=true",
                 "train.logging_steps=1", *overrides])
    assert code == 0
    return json.loads((out / "run_summary.json").read_text())


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the examples name data by paths relative to the repository


def test_pt_lowers_held_out_perplexity(tmp_path: Path) -> None:
    s = _run("pt_wiki_lora.yaml", tmp_path / "pt", "train.max_steps=8", "data.max_samples=4")
    before, after = s["metrics_before"]["perplexity"], s["metrics_after"]["perplexity"]
    assert after < before * 0.97, (before, after)


def test_rm_beats_its_untrained_pair_accuracy(tmp_path: Path) -> None:
    s = _run("rm_lora.yaml", tmp_path / "rm", "train.max_steps=16", "eval.max_samples=32")
    assert s["metrics_after"]["accuracy"] > s["metrics_before"]["accuracy"], s
    assert (tmp_path / "rm" / "value_head.safetensors").is_file()


def test_dpo_raises_reward_accuracy_and_margin(tmp_path: Path) -> None:
    s = _run("dpo_lora.yaml", tmp_path / "dpo", "train.max_steps=12", "eval.max_samples=32")
    before, after = s["metrics_before"], s["metrics_after"]
    assert before["rewards/margins"] == 0.0  # policy == reference before training
    assert after["rewards/accuracies"] > before["rewards/accuracies"] and after["rewards/margins"] > 0, s


def test_cls_mrpc_beats_the_majority_class(tmp_path: Path) -> None:
    s = _run("cls_mrpc_lora.yaml", tmp_path / "cls", "train.num_train_epochs=1")
    after = s["metrics_after"]
    assert after["accuracy"] > after["majority_accuracy"] + 4, after
