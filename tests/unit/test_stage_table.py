"""The stage table is the one place stages differ; export covers every stage; the joints issue 15 named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from peftkit.config import load_config
from peftkit.stages import STAGES, Stage
from peftkit.train.run import train
from tests.helpers import DPO, MRPC, MRPC_COLUMNS, REPO, tiny_run


def _overrides(model: Path, out: Path, stage: str, *flags: str) -> list[str]:
    return tiny_run(model, out, *flags, stage=stage, cutoff_len=96, max_steps=3, learning_rate="5e-3")


def test_no_stage_name_is_tested_outside_the_table() -> None:
    # a stage compared with a name, or looked up in a tuple / list / set of names
    pattern = re.compile(r"""stage\s*(==|!=)|stage\s+(not\s+)?in\s*[(\[{]|["'](sft|pt|rm|dpo|cls)["']\s*(==|!=)""")
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in sorted((REPO / "src/peftkit").rglob("*.py")) if path.name != "stages.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert found == []


def _hinge(model, cfg, reference, tokenizer):
    """A reward-model objective for a stage added in a test: a hinge on the score margin."""
    from peftkit.objectives.pairs import PairwiseReward

    class Hinge(PairwiseReward):
        def __call__(self, model, inputs):
            _, metrics, pairs = super().__call__(model, inputs)
            margin = pairs[:, 0] - pairs[:, 1]
            return torch.relu(1 - margin).mean(), metrics, pairs

    return Hinge()


def test_a_stage_is_one_table_entry(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path) -> None:
    hinge = replace(STAGES["rm"], name="rm_hinge", summary="reward model, hinge loss", objective=_hinge)
    monkeypatch.setitem(STAGES, "rm_hinge", hinge)
    out = tmp_path / "run"
    result = train(load_config(None, _overrides(tiny_model_dir, out, "rm_hinge", f"data.train={DPO}",
                                                "data.format=preference", "data.max_samples=16",
                                                f"eval.dataset={DPO}", "eval.max_samples=8")))
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    first = next(r for r in logs if r["event"] == "log")
    assert first["loss"] == pytest.approx(1.0, abs=0.15)  # relu(1 - margin), fresh head: margin ~ 0 (log 2 if it were rm)
    assert (out / "value_head.safetensors").is_file()  # the value head came from the entry's head="value"
    assert {"accuracy", "margin", "records"} <= result.summary["metrics_after"].keys()  # its scorer
    with pytest.raises(Exception, match="must be one of sft, pt, rm, dpo, kto, grpo, cls, rm_hinge"):
        load_config(None, ["stage=nope", f"train.output_dir={tmp_path}", f"data.train={DPO}"])


def test_stage_table_entries_load() -> None:
    for entry in STAGES.values():
        assert isinstance(entry, Stage)
        for role in ("encoder", "collator", "objective", "metrics", "scorer"):
            if getattr(entry, role) is not None:
                assert callable(entry.load(role)), (entry.name, role)
    from peftkit.model.heads import sums_tokens

    assert [n for n in STAGES if sums_tokens(n)] == ["sft", "pt"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_cls_export_loads_in_plain_transformers_with_equal_logits(which: str, tiny_bert_dir: Path,
                                                                  tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "cls"
    result = train(load_config(None, _overrides(tiny_bert_dir if which == "encoder" else tiny_model_dir, out, "cls",
                                                f"data.train={MRPC}", "data.format=pairs", MRPC_COLUMNS,
                                                "data.max_samples=24")))
    exported = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "peftkit", "export", "--adapter", str(out), "--out", str(exported)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    assert model.config.id2label == {0: "0", 1: "1"}
    tokenizer = AutoTokenizer.from_pretrained(exported)
    batch = tokenizer(["The cat sat.", "A much longer sentence about a dog and a cat."], padding=True, return_tensors="pt")
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, trained(**batch).logits, rtol=0, atol=1e-4)


def test_rm_export_keeps_its_value_head_beside_the_merged_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from peftkit.export import export
    from peftkit.model.value_head import load_value_head, scores, value_head

    out = tmp_path / "rm"
    result = train(load_config(None, _overrides(tiny_model_dir, out, "rm", f"data.train={DPO}",
                                                "data.format=preference", "data.max_samples=16")))
    export(out, tmp_path / "export")
    merged = load_value_head(AutoModelForCausalLM.from_pretrained(tmp_path / "export"), tmp_path / "export").eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    mask = torch.ones_like(ids)

    def score(model) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return scores(hidden, mask, value_head(model))

    torch.testing.assert_close(score(merged), score(result.model.eval()), rtol=0, atol=1e-4)


def test_eval_and_chat_honour_the_config_model_spec_and_template(monkeypatch: pytest.MonkeyPatch,
                                                                 tiny_model_dir: Path, tmp_path: Path,
                                                                 alpaca_file: Path) -> None:
    import peftkit.infer.chat as chat_module
    from peftkit.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_model_dir}, dtype: bfloat16, attn_implementation: eager}}\n"
                      f"data: {{train: {alpaca_file}, template: chatml}}\n"
                      f"eval: {{dataset: {alpaca_file}, max_samples: 2, metrics: [exact_match]}}\n"
                      f"generate: {{max_new_tokens: 2}}\ntrain: {{output_dir: {tmp_path / 'run'}}}\n")
    seen = []
    real = chat_module.load_for_chat

    def spy(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        seen.append((next(model.parameters()).dtype, model.config._attn_implementation, tokenizer.chat_template))
        return model, tokenizer

    monkeypatch.setattr(chat_module, "load_for_chat", spy)
    assert main(["eval", str(config), "--out", str(tmp_path / "eval"), "eval.max_samples=1"]) == 0
    assert main(["chat", "--config", str(config), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    chatml = (REPO / "src/peftkit/data/templates/chatml.jinja").read_text()
    assert seen == [(torch.bfloat16, "eager", chatml)] * 2
    assert json.loads((tmp_path / "eval/predict_results.json").read_text())["records"] == 1  # override after --out


def test_train_end_line_has_no_loss(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny_model_dir, out, "sft", f"data.train={alpaca_file}")))
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    end = rows[-1]
    assert end["event"] == "train_end" and end["loss"] is None and isinstance(end["train_loss"], float)
    assert [r["current_steps"] for r in rows if r["loss"] is not None] == [1, 2, 3]  # one point per step


def test_speedups_off_runs_the_libraries_own_code(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path,
                                                  alpaca_file: Path, tmp_path: Path, caplog) -> None:
    import peftkit.libraries as libraries
    import peftkit.train.speedups as speedups
    import peftkit.train.trainer as trainer_module

    calls = []
    monkeypatch.setattr(speedups, "fused_lora_forward", lambda model: calls.append("fused") or speedups.ExitStack())
    real_loss = trainer_module.chunked_lm_loss
    monkeypatch.setattr(trainer_module, "chunked_lm_loss", lambda *a: calls.append("chunked") or real_loss(*a))
    base = _overrides(tiny_model_dir, tmp_path / "a", "sft", f"data.train={alpaca_file}", "train.max_steps=1")
    train(load_config(None, [*base, "train.peftkit_speedups=off"]))
    assert calls == []
    train(load_config(None, [*base, f"train.output_dir={tmp_path / 'b'}"]))
    assert calls[0] == "fused" and "chunked" in calls
    calls.clear()
    monkeypatch.setitem(libraries.TESTED_VERSIONS, "peft", ((0, 0), (0, 1)))  # as if peft were newer than tested
    with caplog.at_level("WARNING", logger="peftkit"):
        train(load_config(None, [*base, f"train.output_dir={tmp_path / 'c'}"]))
    assert calls == [] and "train.peftkit_speedups: off for peft" in caplog.text


def test_fast_template_rendering_that_differs_is_an_error(monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    import peftkit.data.render as render
    from peftkit.data.encode import Encoding, encode_samples
    from peftkit.errors import PeftkitError

    monkeypatch.setattr(render, "_VERIFIED_TEMPLATES", set())
    tokenizer.chat_template = tokenizer.chat_template + "{# a #}"  # a template not verified yet in this process
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    encode_samples(tokenizer, [{"messages": messages}], [("f", 0)], Encoding(64))  # the same rendering: fine
    assert tokenizer.chat_template in render._VERIFIED_TEMPLATES
    tokenizer.chat_template = tokenizer.chat_template + "{# b #}"
    real = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: real(*a, **k) + "!")
    with pytest.raises(PeftkitError, match="fast chat-template rendering differs"):
        encode_samples(tokenizer, [{"messages": messages}], [("f", 0)], Encoding(64))
