"""Issue 20: pair losses (sigmoid / ipo / hinge / orpo / simpo), kto and grpo — each formula on hand-computed
numbers, each stage trained a few steps on the tiny model, and `peftkit eval` reproducing its metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.config import load_config
from peftkit.errors import ConfigError
from peftkit.objectives.pairs import pair_losses
from peftkit.objectives.unpaired import kto_losses
from peftkit.train.grpo import group_advantages, grpo_token_losses
from peftkit.train.preflight import preflight
from peftkit.train.rewards import build_rewards, score
from peftkit.train.run import train
from tests.helpers import DPO, REPO, tiny_run

KTO = REPO / "data/demo/kto_en_demo.json"
NER = REPO / "data/resume_ner/dev.json"


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def _sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# One pair: summed log-probabilities of the chosen / rejected answers (5 and 7 tokens), and the reference's.
LOGPS, COUNTS, REF = torch.tensor([-10.0, -21.0]), torch.tensor([5, 7]), torch.tensor([-11.0, -19.6])
BETA, GAMMA = 0.1, 0.5


def _expected(kind: str) -> tuple[float, float, float]:
    """(loss, chosen reward, rejected reward) written out from each paper's formula, with scalars."""
    c, r, rc, rr = -10.0, -21.0, -11.0, -19.6
    cm, rm = c / 5, r / 7  # per-token means: -2, -3
    if kind == "sigmoid":  # DPO
        delta = (c - rc) - (r - rr)  # 1 - (-1.4) = 2.4
        return -math.log(_sigma(BETA * delta)), BETA * (c - rc), BETA * (r - rr)
    if kind == "hinge":  # SLiC
        return max(0.0, 1 - BETA * ((c - rc) - (r - rr))), BETA * (c - rc), BETA * (r - rr)
    if kind == "ipo":  # on per-token means
        h = (cm - rc / 5) - (rm - rr / 7)
        return (h - 1 / (2 * BETA)) ** 2, BETA * (cm - rc / 5), BETA * (rm - rr / 7)
    if kind == "simpo":
        return -math.log(_sigma(BETA * (cm - rm) - GAMMA)), BETA * cm, BETA * rm
    # orpo: NLL of the chosen answer + lambda * -log sigma(log odds ratio), odds = p / (1 - p), p = exp(mean logp)
    log_odds = math.log(math.exp(cm) / (1 - math.exp(cm))) - math.log(math.exp(rm) / (1 - math.exp(rm)))
    return -cm - BETA * math.log(_sigma(log_odds)), BETA * cm, BETA * rm


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "simpo", "orpo"])
def test_pair_losses_follow_the_published_formulas(kind: str) -> None:
    ref = None if kind in ("simpo", "orpo") else REF
    loss, rewards, extra = pair_losses(kind, BETA, LOGPS, COUNTS, ref, GAMMA)
    expected_loss, chosen, rejected = _expected(kind)
    assert float(loss[0]) == pytest.approx(expected_loss, rel=1e-5)
    assert rewards[0].tolist() == pytest.approx([chosen, rejected], rel=1e-5)
    if kind == "orpo":
        assert float(extra["nll_loss"][0]) == pytest.approx(2.0)
        assert set(extra) == {"log_odds_ratio", "log_odds_chosen", "nll_loss"}
    if ref is not None:
        with pytest.raises(ValueError, match="needs the reference"):
            pair_losses(kind, BETA, LOGPS, COUNTS, None)


def test_kto_losses_on_fixed_numbers() -> None:
    # two examples: desirable with log-ratio +2, undesirable with log-ratio -1; mismatched rows' log-ratios 0.5, 0.3
    logps, ref = torch.tensor([-8.0, -12.0]), torch.tensor([-10.0, -11.0])
    kl_logps, kl_ref = torch.tensor([-20.0, -30.0]), torch.tensor([-20.5, -30.3])
    losses, kl = kto_losses(logps, ref, kl_logps, kl_ref, torch.tensor([1, 0]), beta=0.5, weights=(1.0, 2.0))
    assert float(kl) == pytest.approx(0.4)
    assert losses.tolist() == pytest.approx([1 - _sigma(0.5 * (2 - 0.4)), 2 * (1 - _sigma(0.5 * (0.4 + 1)))], rel=1e-5)
    # the KL reference point is clamped at 0 and carries no gradient
    _, kl = kto_losses(logps, ref, kl_logps, kl_logps + 1, torch.tensor([1, 0]), beta=0.5)
    assert float(kl) == 0.0


def test_grpo_advantages_and_token_loss_on_fixed_numbers() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    std = math.sqrt((0.25 + 0.25) / 3)  # unbiased, of [1, 0, .5, .5]
    assert adv.tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0, 0, 0, 0, 0, 0], abs=1e-6)
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, 0, 0, 0, 0, 0, 0])

    # ratio 1.5 on token 0 (clipped to 1.2 for a positive advantage, not for a negative one), 1 on token 1
    old = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    logps = (old + torch.tensor([[math.log(1.5), 0.0], [math.log(1.5), 0.0]])).requires_grad_()
    advantages = torch.tensor([2.0, -1.0])
    ref = logps.detach() + 0.1  # ref − log π = 0.1 everywhere
    losses, clipped, kl = grpo_token_losses(logps, old, advantages, epsilon=0.2, beta=0.04, ref_logps=ref)
    k3 = math.exp(0.1) - 0.1 - 1
    assert kl.flatten().tolist() == pytest.approx([k3] * 4, rel=1e-5)
    assert losses.flatten().tolist() == pytest.approx([-1.2 * 2 + 0.04 * k3, -2 + 0.04 * k3,
                                                       1.5 + 0.04 * k3, 1 + 0.04 * k3], rel=1e-5)
    assert clipped.tolist() == [[True, False], [False, False]]
    losses.sum().backward()
    # d/dlogπ of −ρA is −ρA (ρ = exp(log π − log π_old)); clipped tokens pass no policy gradient;
    # d/dlogπ of β·k3 is β·(1 − exp(ref − log π))
    dk3 = 0.04 * (1 - math.exp(0.1))
    assert logps.grad.flatten().tolist() == pytest.approx([dk3, -2 + dk3, 1.5 + dk3, 1 + dk3], rel=1e-5)


def count_braces(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """A user reward function, configured as tests.unit.test_preference_rl:count_braces."""
    return [float(c.count("{")) for c in completions]


def test_reward_functions() -> None:
    ref = '{"姓名": ["吴重阳"], "国籍": ["中国国籍"]}'
    completions = [ref, '{"姓名": ["吴重阳"]}', "not json", '{"姓名": ["别人"]}' + " " * 40]
    rewards, issues = build_rewards(["ner_json_f1", "exact_match", "json_valid", {"name": "regex:^\\{.*\\}$", "weight": 2},
                                     "length_penalty", "tests.unit.test_preference_rl:count_braces"])
    assert issues == []
    values = score(rewards, ["p"] * 4, completions, [ref] * 4)
    assert values[:, 0].tolist() == pytest.approx([1.0, 2 / 3, 0.0, 0.0])  # entity F1: 2·1/(1+2)
    assert values[:, 1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert values[:, 2].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert values[:, 3].tolist() == [1.0, 1.0, 0.0, 0.0]  # trailing spaces: `$` does not match after `}`+spaces
    assert values[:, 4].tolist() == pytest.approx([0.0, 0.0, 0.0, -(len(completions[3]) - len(ref)) / len(ref)])
    assert values[:, 5].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert [r.weight for r in rewards] == [1, 1, 1, 2, 1, 1]
    _, issues = build_rewards(["nope", "regex:(", "tests.unit.test_preference_rl:missing", {"weight": 1}])
    assert len(issues) == 4 and issues[0].startswith("grpo.rewards[0]: 'nope' is neither a built-in")


def test_grpo_config_errors(tmp_path: Path) -> None:
    base = [f"data.train={NER}", "stage=grpo", f"train.output_dir={tmp_path}"]
    with pytest.raises(ConfigError) as e:
        load_config(None, base)
    assert "grpo.rewards: stage grpo needs at least one reward function" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "grpo.rewards=[ner_json_f1]", "grpo.num_generations=1"])
    assert "grpo.num_generations=1: at least 2" in str(e.value)
    with pytest.raises(ConfigError) as e:  # the reward functions are train's: checked at its start, before any work
        preflight(load_config(None, [*base, "grpo.rewards=[ner_json_f1, ner_jsn]"]))
    assert "grpo.rewards[1]: 'ner_jsn' is neither a built-in" in str(e.value)
    with pytest.raises(ConfigError, match="must be one of sigmoid, ipo, hinge, orpo, simpo"):
        load_config(None, [f"data.train={DPO}", "data.format=preference", "stage=dpo", "finetuning.pref_loss=kto",
                           f"train.output_dir={tmp_path}"])


def _overrides(model: Path, out: Path, stage: str, *flags: str) -> list[str]:
    return tiny_run(model, out, *flags, stage=stage, cutoff_len=96, max_steps=3, learning_rate="5e-3")


@pytest.mark.parametrize("kind", ["ipo", "hinge", "orpo", "simpo"])
def test_each_pair_loss_trains_and_logs_its_metrics(kind: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / kind
    train(load_config(None, _overrides(tiny_model_dir, out, "dpo", f"data.train={DPO}", "data.format=preference",
                                       "data.max_samples=12", f"finetuning.pref_loss={kind}")))
    steps = [r for r in _log(out) if r["event"] == "log"]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    expected = {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen"}
    if kind == "orpo":
        expected |= {"log_odds_ratio", "log_odds_chosen", "nll_loss"}
    assert expected <= steps[0].keys()
    assert steps[-1]["reward"] == steps[-1]["rewards/margins"]


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_reference_free_losses_build_no_reference_even_for_full_tuning(kind: str, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from peftkit.objectives.build import build_objective

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # no adapter to disable
    cfg = load_config(None, [f"data.train={DPO}", "data.format=preference", "stage=dpo", f"finetuning.pref_loss={kind}",
                             "train.output_dir=/tmp/unused"])
    built = []
    assert build_objective("dpo", model, cfg, reference=lambda: built.append(1)).reference is None and built == []
    cfg.finetuning.pref_loss = "sigmoid"
    build_objective("dpo", model, cfg, reference=lambda: built.append(1))
    assert built == [1]


def _cli_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`peftkit train CONFIG key=value ...` in a process of its own; the config file holds only the stage."""
    stage = next(o for o in overrides if o.startswith("stage="))
    config = tmp_path / "config_in.yaml"
    config.write_text(f"stage: {stage.split('=', 1)[1]}\n")
    return subprocess.run([sys.executable, "-m", "peftkit", "train", str(config), *(o for o in overrides if o != stage)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def test_kto_trains_through_peftkit_train_and_eval_reproduces_it(tiny_model_dir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from peftkit.cli import main

    out = tmp_path / "kto"
    # kto's own data (messages + label) to train; preference pairs to evaluate, as the dpo runs are
    run = _cli_train(tmp_path, *_overrides(tiny_model_dir, out, "kto", f"data.train=[{{path: {KTO}, format: messages}}]",
                                 "data.format=preference", "data.max_samples=12", f"eval.dataset={DPO}",
                                 "eval.max_samples=6"))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "data_report.json").read_text())
    labels = [r["label"] for r in json.loads(KTO.read_text())[:12]]
    assert report["judged"] == {"desirable": sum(labels), "undesirable": 12 - sum(labels)}
    assert f"kto: {sum(labels)} desirable, {12 - sum(labels)} undesirable examples" in run.stdout + run.stderr
    steps = [r for r in _log(out) if r["event"] == "log"]
    assert {"kl", "rewards/chosen", "rewards/rejected"} <= steps[0].keys()
    after = json.loads((out / "run_summary.json").read_text())["metrics_after"]
    capsys.readouterr()
    assert main(["eval", str(out / "config.yaml"), "--adapter", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pairs"] == 6 and printed["examples"] == 12
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"} <= printed.keys()
    for key in ("rewards/accuracies", "rewards/margins", "eval_loss"):
        assert printed[key] == pytest.approx(after[key], rel=1e-4, abs=1e-5)
    lines = [json.loads(x) for x in (out / "pair_scores.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {"record", "chosen", "rejected", "correct"} <= lines[0].keys()


def test_kto_needs_a_label(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "unlabelled.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]))
    run = _cli_train(tmp_path, *_overrides(tiny_model_dir, tmp_path / "out", "kto", f"data.train={data}", "data.format=messages"))
    assert run.returncode == 2
    assert "record 0" in run.stderr and "'label'" in run.stderr and "stage kto needs true" in run.stderr
    assert "Traceback" not in run.stderr


def test_grpo_trains_logs_its_rewards_and_eval_reproduces_it(tiny_model_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    from peftkit.cli import main

    out = tmp_path / "grpo"
    run = _cli_train(tmp_path, *_overrides(tiny_model_dir, out, "grpo", f"data.train={NER}", "data.format=alpaca",
                                 "data.max_samples=4", "train.per_device_train_batch_size=2", "grpo.max_new_tokens=12",
                                 "grpo.num_generations=3", "grpo.beta=0.04",
                                 "grpo.rewards=[ner_json_f1, {name: 'tests.unit.test_preference_rl:count_braces', "
                                 "weight: 0.5}]", f"eval.dataset={NER}", "eval.max_samples=3", "eval.metrics=[ner_json]",
                                 "generate.max_new_tokens=12", "train.seed=3"))
    assert run.returncode == 0, run.stderr[-3000:]
    steps = [r for r in _log(out) if r["event"] == "log"]
    keys = {"reward", "reward_std", "rewards/ner_json_f1", "rewards/tests.unit.test_preference_rl:count_braces", "kl",
            "completion_length", "completions/truncated", "clip_ratio"}
    assert keys <= steps[0].keys()
    for r in steps:  # reward = the weighted sum of the functions' means; a fresh LoRA starts at the reference
        assert r["reward"] == pytest.approx(r["rewards/ner_json_f1"] +
                                            0.5 * r["rewards/tests.unit.test_preference_rl:count_braces"], abs=1e-5)
        assert 0 < r["completion_length"] <= 12 and r["clip_ratio"] == 0.0 and r["kl"] >= 0
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    summary = json.loads((out / "run_summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out / "config.yaml"), "--adapter", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["f1"] == summary["metrics_after"]["f1"] and printed["invalid_json"] == summary["metrics_after"]["invalid_json"]


def count_e(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    return [float(c.count("e")) for c in completions]


@pytest.mark.slow
def test_grpo_raises_the_reward_it_is_given(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The direction of the update: rewarding the letter e makes the sampled answers hold more of it."""
    out = tmp_path / "grpo_e"
    train(load_config(None, _overrides(tiny_model_dir, out, "grpo", f"data.train={NER}", "data.format=alpaca",
                                       "data.max_samples=64", "train.max_steps=30", "train.learning_rate=1e-2",
                                       "grpo.max_new_tokens=16", "grpo.rewards=[tests.unit.test_preference_rl:count_e]",
                                       "train.seed=0")))
    rewards = [r["reward"] for r in _log(out) if r["event"] == "log"]
    assert len(rewards) == 30
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > 1.3 * first, rewards
