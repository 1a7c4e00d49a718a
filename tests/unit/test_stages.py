"""The stages beyond SFT on tiny models: pt blocks, rm value head, dpo loss and reference, cls heads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from peftkit.config import load_config
from peftkit.config.schema import DataArgs
from peftkit.constants import IGNORE_INDEX, VALUE_HEAD_FILE
from peftkit.data.dataset import build_dataset, prepare_data
from peftkit.errors import ConfigError
from peftkit.train.run import train
from tests.helpers import DPO, MRPC, MRPC_COLUMNS, REPO, tiny_run

WIKI = REPO / "data/demo/wiki_demo.txt"


def _overrides(model: Path, out: Path, stage: str, *flags: str) -> list[str]:
    return tiny_run(model, out, *flags, stage=stage, cutoff_len=96, max_steps=3, learning_rate="5e-3")


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def test_each_stage_needs_its_record_format(tmp_path: Path, alpaca_file: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.train={alpaca_file}", f"train.output_dir={tmp_path}", "stage=rm"])
    assert "stage rm trains on preference records" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.train={DPO}", "data.format=preference", "data.packing=true", "stage=dpo",
                           f"train.output_dir={tmp_path}"])
    assert "packing applies to sft and pt only" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.train={DPO}", "stage=ppo", f"train.output_dir={tmp_path}"])
    assert "stage='ppo': must be one of sft, pt, rm, dpo, kto, grpo, cls" in str(e.value)


def test_pt_joins_documents_into_full_blocks_and_reports_the_tail(tokenizer) -> None:
    ds, report = build_dataset([str(WIKI)], DataArgs(format="text", cutoff_len=64), tokenizer, stage="pt")
    docs = [line for line in WIKI.read_text().splitlines() if line.strip()]
    expected = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)  # + EOS each
    lengths = [len(r) for r in ds["input_ids"]]
    assert all(n == 64 for n in lengths[:-1]) and 2 <= lengths[-1] <= 64
    assert sum(lengths) + sum(e["count"] for e in report.datasets[0].drops.reasons.values()) == expected
    assert report.datasets[0].last_block_tokens == lengths[-1]
    assert ds["labels"] == ds["input_ids"]  # every token supervised
    assert "the last one holds the" in report.summary()
    eos = tokenizer.eos_token_id
    assert sum(row.count(eos) for row in ds["input_ids"]) >= len(docs) - 1  # documents separated by EOS


def test_preference_pairs_supervise_only_each_answer(tokenizer) -> None:
    data = prepare_data(DataArgs(train=str(DPO), format="preference", cutoff_len=128, max_samples=8), tokenizer,
                        stage="rm")
    row = data.train[0]
    record = json.loads(DPO.read_text())[0]
    for side, key in (("", "chosen"), ("rejected_", "rejected")):
        ids, labels = row[f"{side}input_ids"], row[f"{side}labels"]
        supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert tokenizer.decode(supervised).startswith(record[key]["value"][:20])
        assert labels[0] == IGNORE_INDEX and len(ids) <= 128
    assert data.report.stage == "rm" and "rejected:" in data.report.example
    assert data.report.truncated == 8 and "8 of 8 pairs lose the end of an answer" in data.report.summary()
    whole = prepare_data(DataArgs(train=str(DPO), format="preference", cutoff_len=4096, max_samples=8), tokenizer,
                         stage="rm")
    assert whole.report.truncated == 0 and "lose the end" not in whole.report.summary()


def test_rm_trains_saves_value_head_and_reloads_equal_scores(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peftkit.eval.scoring import score_pairs
    from peftkit.infer.chat import load_for_chat

    out = tmp_path / "rm"
    cfg = load_config(None, _overrides(tiny_model_dir, out, "rm", f"data.train={DPO}", "data.format=preference",
                                       "data.max_samples=16", f"eval.dataset={DPO}", "eval.max_samples=8"))
    result = train(cfg)
    assert (out / VALUE_HEAD_FILE).is_file() and (out / "adapter_model.safetensors").is_file()
    logs = [r for r in _log(out) if r["event"] == "log"]
    assert len(logs) == 3 and all({"accuracy", "margin"} <= r.keys() and r["reward"] == r["margin"] for r in logs)
    assert logs[0]["loss"] == pytest.approx(-math.log(torch.sigmoid(torch.tensor(0.0)).item()), abs=0.05)
    in_memory = result.summary["metrics_after"]
    model, tokenizer = load_for_chat(str(tiny_model_dir), str(out), "rm")
    reloaded = score_pairs(model, tokenizer, cfg, tmp_path)
    assert reloaded["accuracy"] == in_memory["accuracy"]
    assert reloaded["margin"] == pytest.approx(in_memory["margin"], abs=1e-5)
    lines = [json.loads(line) for line in (out / "pair_scores.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {"chosen", "rejected", "correct"} <= lines[0].keys()


def test_rm_full_tuning_keeps_head_out_of_the_model_and_restores_the_best(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from peftkit.model.value_head import value_head

    out = tmp_path / "rm_full"
    result = train(load_config(None, _overrides(
        tiny_model_dir, out, "rm", f"data.train={DPO}", "data.format=preference", "data.max_samples=16",
        "data.val_size=4", "finetuning.finetuning_type=full", "train.max_steps=4", "train.eval_strategy=steps",
        "train.eval_steps=2", "train.save_strategy=steps", "train.save_steps=2", "train.load_best_model_at_end=true",
        "train.metric_for_best_model=accuracy", "train.learning_rate=1e-3")))
    assert not any(k.startswith("v_head") for k in load_file(str(out / "model.safetensors")))
    evals = [r for r in _log(out) if r["event"] == "eval"]
    assert evals and all("eval_accuracy" in r and r["reward"] == r["eval_margin"] for r in evals)
    best = json.loads((out / "trainer_state.json").read_text())["best_model_checkpoint"]
    saved = load_file(str(Path(best) / VALUE_HEAD_FILE))
    torch.testing.assert_close(value_head(result.model).weight.detach(), saved["weight"])


def test_dpo_lora_reference_is_the_adapter_disabled(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peftkit.objectives.build import build_objective
    from peftkit.objectives.pairs import DirectPreference

    out = tmp_path / "dpo"
    cfg = load_config(None, _overrides(tiny_model_dir, out, "dpo", f"data.train={DPO}", "data.format=preference",
                                       "data.max_samples=16", "finetuning.pref_beta=0.2"))
    result = train(cfg)
    logs = [r for r in _log(out) if r["event"] == "log"]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference before the first update
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["reward"] == r["rewards/margins"] for r in logs)
    assert build_objective("dpo", result.model).reference is None  # no second copy of the model

    # the loss equals the DPO formula computed with an explicit copy of the base model as reference
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftkit.data.collate import PairCollator

    tokenizer = _tok(tiny_model_dir)  # its pad token id is 0
    data = prepare_data(cfg.data, tokenizer, stage="dpo")
    batch = PairCollator(tokenizer)([data.train[i] for i in range(4)])
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        loss, _, _ = DirectPreference(0.2)(policy, batch)
        expected, _, _ = DirectPreference(0.2, reference=base)(policy, batch)
        manual = _manual_dpo(policy, base, batch, 0.2)
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)
    assert float(loss) == pytest.approx(manual, abs=1e-5)


def _tok(folder: Path):
    from peftkit.config.schema import ModelArgs
    from peftkit.model import load_tokenizer

    return load_tokenizer(ModelArgs(name_or_path=str(folder)))


def _manual_dpo(policy, reference, batch, beta: float) -> float:
    def logps(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        lp = torch.log_softmax(logits.float(), -1)
        out = []
        for row, lab, mask in zip(lp, labels, labels != IGNORE_INDEX):
            out.append(sum(row[i, lab[i]] for i in range(len(lab)) if mask[i]))
        return torch.stack(out)

    pi, ref = logps(policy), logps(reference)
    n = len(pi) // 2
    z = beta * ((pi[:n] - ref[:n]) - (pi[n:] - ref[n:]))
    return float(-torch.nn.functional.logsigmoid(z).mean())


def test_dpo_full_tuning_uses_a_frozen_reference_and_an_sft_term(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dpo_full"
    train(load_config(None, _overrides(tiny_model_dir, out, "dpo", f"data.train={DPO}", "data.format=preference",
                                       "data.max_samples=8", "finetuning.finetuning_type=full",
                                       "finetuning.pref_ftx=1.0", "train.learning_rate=1e-4")))
    first = next(r for r in _log(out) if r["event"] == "log")
    # rewards are 0 at the first step; the loss is log 2 plus the mean NLL per token of the chosen answers
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] > math.log(2) + 1.0


@pytest.mark.slow
@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_cls_trains_head_in_full_with_lora_and_eval_writes_predictions(
        which: str, tiny_bert_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tiny_bert_dir if which == "encoder" else tiny_model_dir
    out = tmp_path / "cls"
    cfg = load_config(None, _overrides(model_dir, out, "cls", f"data.train={MRPC}", "data.format=pairs", MRPC_COLUMNS,
                                       "data.max_samples=24", f"eval.dataset={REPO / 'data/mrpc/dev.tsv'}",
                                       "eval.max_samples=12", "data.val_size=8", "train.eval_strategy=steps",
                                       "train.eval_steps=3"))
    result = train(cfg)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    head = "classifier" if which == "encoder" else "score"
    assert any(f"{head}.modules_to_save" in n for n in trainable) and any("lora_A" in n for n in trainable)
    metrics = result.summary["metrics_after"]
    assert {"accuracy", "f1", "f1_positive", "majority_accuracy"} <= metrics.keys() and metrics["records"] == 12
    evals = [r for r in _log(out) if r["event"] == "eval"]
    assert "eval_accuracy" in evals[-1] and "eval_f1" in evals[-1]
    lines = [json.loads(line) for line in (out / "class_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and lines[0]["label"] in ("0", "1") and len(lines[0]["probabilities"]) == 2
    report = json.loads((out / "data_report.json").read_text())
    assert report["classes"] == ["0", "1"]

    # `peftkit eval` reloads base + adapter with the run's classes and predicts the same classes
    proc = subprocess.run([sys.executable, "-m", "peftkit", "eval", str(out / "config.yaml"), "--adapter", str(out)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["accuracy"] == metrics["accuracy"]


def test_rm_resume_restores_the_value_head_of_the_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "rm_resume"
    flags = [f"data.train={DPO}", "data.format=preference", "data.max_samples=8", "train.max_steps=2",
             "train.save_strategy=steps", "train.save_steps=2"]
    train(load_config(None, _overrides(tiny_model_dir, out, "rm", *flags)))
    saved = load_file(str(out / "checkpoint-2" / VALUE_HEAD_FILE))
    (out / VALUE_HEAD_FILE).unlink()
    # a resumed run with nothing left to train saves what it restored, not a freshly initialised head
    # (the same seed would give the untrained head; two steps at lr 5e-3 moved it away from that)
    train(load_config(None, _overrides(tiny_model_dir, out, "rm", *flags, "train.resume_from_checkpoint=true")))
    torch.testing.assert_close(load_file(str(out / VALUE_HEAD_FILE)), saved)


def test_cls_eval_records_keep_their_location_and_refuse_unknown_classes(tokenizer, tmp_path: Path) -> None:
    from peftkit.data.dataset import encode_records
    from peftkit.errors import DataError

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"text": "a", "text_pair": "b", "label": 1}\n{"text": "c", "label": 7}\n')
    args = DataArgs(format="pairs", cutoff_len=32)
    (sample, where, ex), = encode_records([str(path)], replace(args, max_samples=1), tokenizer, "cls", ["0", "1"])
    assert where.endswith("pairs.jsonl: line 1") and ex.labels == 1 and sample["text_pair"] == "b"
    with pytest.raises(DataError, match="7 is not one of the classes"):
        encode_records([str(path)], args, tokenizer, "cls", ["0", "1"])


@pytest.mark.parametrize(("stage", "data", "metric"), [
    ("pt", [f"data.train={WIKI}", "data.format=text", "data.max_samples=6", f"eval.dataset={WIKI}",
            "eval.max_samples=3", "eval.metrics=[loss]"], "perplexity"),
    ("rm", [f"data.train={DPO}", "data.format=preference", "data.max_samples=8", f"eval.dataset={DPO}",
            "eval.max_samples=6"], "accuracy"),
    ("dpo", [f"data.train={DPO}", "data.format=preference", "data.max_samples=8", f"eval.dataset={DPO}",
             "eval.max_samples=6"], "rewards/margins"),
])
def test_peftkit_eval_on_a_trained_run_reproduces_its_metrics(stage: str, data: list[str], metric: str,
                                                               tiny_model_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from peftkit.cli import main

    out = tmp_path / stage
    after = train(load_config(None, _overrides(tiny_model_dir, out, stage, *data))).summary["metrics_after"]
    capsys.readouterr()
    assert main(["eval", str(out / "config.yaml"), "--adapter", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[metric] == pytest.approx(after[metric], rel=1e-4, abs=1e-5)
    if stage in ("rm", "dpo"):  # per pair, each line naming its record
        lines = [json.loads(x) for x in (out / "pair_scores.jsonl").read_text().splitlines()]
        assert len(lines) == 6 and lines[0]["chosen"] is not None
