"""What trains under each finetuning_type, and clear errors for targets that match nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.config.schema import FinetuningArgs, ModelArgs
from peftkit.errors import ConfigError
from peftkit.model import count_parameters, load_model, prepare_for_training


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_all_targets_every_linear_of_the_decoder(tiny_model_dir: Path) -> None:
    model = prepare_for_training(load_model(ModelArgs(name_or_path=str(tiny_model_dir))), FinetuningArgs())
    names = _trainable(model)
    assert names and all("lora_" in n for n in names)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{proj}.lora_A" in n for n in names), proj
    assert not any("lm_head" in n for n in names)


def test_lora_named_targets(tiny_model_dir: Path) -> None:
    args = FinetuningArgs(lora_target=["q_proj", "v_proj"])
    model = prepare_for_training(load_model(ModelArgs(name_or_path=str(tiny_model_dir))), args)
    assert {n.split(".")[-4] for n in _trainable(model)} == {"q_proj", "v_proj"}


def test_lora_target_that_matches_nothing(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="finetuning.lora_target=\\['qkv'\\]"):
        prepare_for_training(load_model(ModelArgs(name_or_path=str(tiny_model_dir))), FinetuningArgs(lora_target=["qkv"]))


def test_freeze_named_modules(tiny_model_dir: Path) -> None:
    args = FinetuningArgs(finetuning_type="freeze", freeze_trainable_modules=["mlp"])
    model = prepare_for_training(load_model(ModelArgs(name_or_path=str(tiny_model_dir))), args)
    names = _trainable(model)
    assert names and all(".mlp." in n for n in names)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_freeze_module_that_matches_nothing(tiny_model_dir: Path) -> None:
    args = FinetuningArgs(finetuning_type="freeze", freeze_trainable_modules=["adapter"])
    with pytest.raises(ConfigError, match="matches no parameter of this model"):
        prepare_for_training(load_model(ModelArgs(name_or_path=str(tiny_model_dir))), args)


def test_full_trains_everything(tiny_model_dir: Path) -> None:
    model = prepare_for_training(load_model(ModelArgs(name_or_path=str(tiny_model_dir))), FinetuningArgs(finetuning_type="full"))
    trainable, total = count_parameters(model)
    assert trainable == total
