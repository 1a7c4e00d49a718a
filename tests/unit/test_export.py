"""Export: merged folders load in plain transformers with the run's logits; checks block bad exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.config import load_config
from peftkit.errors import PeftkitError
from peftkit.export import checks, export
from peftkit.train.run import train


def _run(tiny_model_dir: Path, alpaca_file: Path, out: Path, ft: str):
    return train(load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={alpaca_file}", f"train.output_dir={out}",
        f"finetuning.finetuning_type={ft}", "train.max_steps=3", "train.learning_rate=1e-2",
        "train.per_device_train_batch_size=4", "train.disable_tqdm=true",
    ]))


@pytest.mark.parametrize("ft", ["lora", "full"])
def test_export_round_trip(ft: str, tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = _run(tiny_model_dir, alpaca_file, tmp_path / "run", ft)
    out = tmp_path / "export"
    out.mkdir()
    (out / "export_report.json").write_text("{}")  # a previous export: export may replace it
    (out / "model-00009-of-00009.safetensors").write_text("stale")  # must not survive
    report = export(tmp_path / "run", out, max_shard_size="100KB")
    assert report.max_logit_diff < 1e-4 and report.records_checked == 8
    names = {p.name for p in out.iterdir()}
    assert "model-00009-of-00009.safetensors" not in names
    assert "model.safetensors.index.json" in names  # sharded at the requested size
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert not any(n.startswith(".") for n in {p.name for p in tmp_path.iterdir()})  # no temporary folder left
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    ids = torch.tensor([[1, 5, 9, 42]])
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tmp_path / "run").chat_template
    assert json.loads((out / "export_report.json").read_text())["finetuning_type"] == ft


def test_failed_logit_check_writes_nothing(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, monkeypatch) -> None:
    _run(tiny_model_dir, alpaca_file, tmp_path / "run", "lora")
    real = checks._logits
    calls = []

    def shifted(model, prompts):
        calls.append(1)
        logits = real(model, prompts)
        return logits if len(calls) == 1 else [x + 1e-3 for x in logits]

    monkeypatch.setattr(checks, "_logits", shifted)
    with pytest.raises(PeftkitError, match="reloaded logits differ from the run's by 1.00e-03"):
        export(tmp_path / "run", tmp_path / "export")
    assert not (tmp_path / "export").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_changed_chat_template_fails_the_check(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, monkeypatch) -> None:
    _run(tiny_model_dir, alpaca_file, tmp_path / "run", "lora")
    from transformers import AutoTokenizer

    real_load = AutoTokenizer.from_pretrained

    def other_template(path, *a, **k):
        tok = real_load(path, *a, **k)
        if Path(path).name.startswith(".export."):  # the temporary folder the export is checked in
            tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
        return tok

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", other_template)
    with pytest.raises(PeftkitError, match="renders .* record 0 differently from training"):
        export(tmp_path / "run", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_of_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(PeftkitError, match="not a peftkit output_dir"):
        export(tmp_path, tmp_path / "export")


def test_the_export_targets_are_one_table_and_refuse_what_they_do_not_take(tmp_path: Path) -> None:
    """--format merged (what refusals tell users to run) parses, like the table's other keys; a wrong format or an
    option of another target is refused before anything is read."""
    from peftkit.cli.parser import build_parser
    from peftkit.export import TARGETS

    assert list(TARGETS) == ["merged", "gguf", "gguf-lora"]
    for fmt in (*TARGETS, "hf"):
        assert build_parser().parse_args(["export", "--adapter", "r", "--out", "o", "--format", fmt]).format == fmt
    with pytest.raises(PeftkitError, match=r"--format zip: one of merged, gguf, gguf-lora"):
        export(tmp_path, tmp_path / "out", "zip")
    with pytest.raises(PeftkitError, match=r"--format gguf-lora takes no quant"):
        export(tmp_path, tmp_path / "out", "gguf-lora", quant="f16")
