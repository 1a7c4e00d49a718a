"""The LoRA family flags reach peft, train, save and reload in plain peft with equal logits; LoRA+ rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.config import load_config
from peftkit.errors import ConfigError
from peftkit.train.run import train
from tests.helpers import tiny_run


def _run(tiny_model_dir: Path, alpaca_file: Path, out: Path, *flags: str):
    return train(load_config(None, tiny_run(tiny_model_dir, out, *flags, data=alpaca_file)))


@pytest.mark.parametrize("flags", [
    ["finetuning.use_dora=true"],
    ["finetuning.use_rslora=true"],
    ["finetuning.init_lora_weights=gaussian"],
    ["finetuning.init_lora_weights=pissa"],
    ["finetuning.init_lora_weights=olora"],
    ["finetuning.modules_to_save=[lm_head]"],
    ["finetuning.lora_target=.*\\.self_attn\\.(q|v)_proj"],
    ["finetuning.loraplus_lr_ratio=16"],
], ids=["dora", "rslora", "gaussian", "pissa", "olora", "modules_to_save", "regex_target", "loraplus"])
def test_flag_trains_saves_and_reloads(flags: list[str], tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "run"
    result = _run(tiny_model_dir, alpaca_file, out, *flags)
    config = json.loads((out / "adapter_config.json").read_text())
    key, _, value = flags[0].removeprefix("finetuning.").partition("=")
    if key == "use_dora":
        assert config["use_dora"] is True
    elif key == "use_rslora":
        assert config["use_rslora"] is True
    elif key == "init_lora_weights" and value in ("pissa", "olora"):
        # converted for the original model: a plain LoRA of twice the rank, loaded below on the untouched base
        assert config["r"] == 2 * 8 and (out / "lora_init" / "adapter_config.json").is_file()
    elif key == "init_lora_weights":
        assert config["init_lora_weights"] == "gaussian"
    elif key == "modules_to_save":
        assert config["modules_to_save"] == ["lm_head"]
    elif key == "lora_target":
        assert config["target_modules"] == value
        assert {n.split(".")[-4] for n, p in result.model.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_loraplus_gives_b_matrices_the_higher_rate(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from peftkit.train.trainer import PeftTrainer

    seen = {}
    real = PeftTrainer.create_optimizer

    def spy(self, *args):
        optimizer = real(self, *args)
        names = {id(p): n for n, p in self.model.named_parameters()}
        seen.update({names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]})
        return optimizer

    monkeypatch.setattr(PeftTrainer, "create_optimizer", spy)
    _run(tiny_model_dir, alpaca_file, tmp_path / "run", "finetuning.loraplus_lr_ratio=16", "train.lr_scheduler_type=constant")
    assert seen and all(lr == pytest.approx(0.16 if "lora_B" in n else 0.01) for n, lr in seen.items())


def test_lora_flags_on_other_types_are_refused(tmp_path: Path, alpaca_file: Path) -> None:
    with pytest.raises(ConfigError, match="apply to finetuning_type lora, not full"):
        load_config(None, [f"data.train={alpaca_file}", f"train.output_dir={tmp_path}/o",
                           "finetuning.finetuning_type=full", "finetuning.use_dora=true"])


def test_training_continues_an_existing_adapter(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    first = tmp_path / "first"
    evaluate = [f"eval.dataset={alpaca_file}", "eval.before_training=true", "generate.max_new_tokens=8"]
    _run(tiny_model_dir, alpaca_file, first, "finetuning.lora_rank=4", "train.max_steps=4", *evaluate)
    # learning rate 0: the continued run must start from, and keep, exactly the first run's adapter
    second = tmp_path / "second"
    result = _run(tiny_model_dir, alpaca_file, second, f"finetuning.adapter_name_or_path={first}", "train.learning_rate=0",
                  *evaluate)
    # and its "before training" answers are the first adapter's, not the bare base model's
    answers = {name: [json.loads(x)["predict"] for x in (run / name).read_text().splitlines()] for run, name in (
        (first, "generated_predictions_before.jsonl"), (first, "generated_predictions.jsonl"))}
    before_second = [json.loads(x)["predict"] for x in (second / "generated_predictions_before.jsonl").read_text().splitlines()]
    assert before_second == answers["generated_predictions.jsonl"] != answers["generated_predictions_before.jsonl"]
    assert any(p.requires_grad for n, p in result.model.named_parameters() if "lora_" in n)  # loaded trainable
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((second / "adapter_config.json").read_text())["r"] == 4  # the adapter's own settings
    with pytest.raises(ConfigError, match="has no adapter_config.json"):
        _run(tiny_model_dir, alpaca_file, tmp_path / "third", f"finetuning.adapter_name_or_path={tmp_path}")


def test_adapters_stack_earlier_merged_last_trained(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a, b = tmp_path / "a", tmp_path / "b"
    _run(tiny_model_dir, alpaca_file, a, "finetuning.lora_rank=4")
    _run(tiny_model_dir, alpaca_file, b, "finetuning.lora_rank=2", "train.seed=3")
    stacked = _run(tiny_model_dir, alpaca_file, tmp_path / "s", f"finetuning.adapter_name_or_path=[{a},{b}]",
                   "train.learning_rate=0").model.eval()
    trainable = {n for n, p in stacked.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.shape[0] for n, p in stacked.named_parameters() if "lora_A" in n} == {2}  # only b's adapter is left
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = PeftModel.from_pretrained(PeftModel.from_pretrained(base, a).merge_and_unload(), b).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(stacked(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=1e-5)
