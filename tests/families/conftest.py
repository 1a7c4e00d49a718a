"""The family tier's models: one tiny random checkpoint folder per family, built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.families.zoo import config_of


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[[str], Path]:
    """family → a saved checkpoint (weights moved off their initialisation, so a leak between records moves the
    loss as well as the gradients) with the test tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built: dict[str, Path] = {}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def build(family: str) -> Path:
        if family not in built:
            torch.manual_seed(0)
            config = config_of(family, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                               tokenizer.eos_token_id)
            model = AutoModelForCausalLM.from_config(config)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            out = tmp_path_factory.mktemp(f"family_{family}")
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            built[family] = out
        return built[family]

    return build


@pytest.fixture(scope="session")
def family_run(tmp_path_factory: pytest.TempPathFactory, family_dir: Callable[[str], Path]) -> Callable[[str], Path]:
    """family → the output_dir of a 2-step LoRA run on it (packed where the family allows it), trained once."""
    import json

    from peftkit.config import load_config
    from peftkit.train.run import train
    from tests.conftest import ALPACA_RECORDS
    from tests.families.zoo import NO_PACKING
    from tests.helpers import tiny_run

    data = tmp_path_factory.mktemp("family_data") / "train.json"
    data.write_text(json.dumps(ALPACA_RECORDS, ensure_ascii=False), encoding="utf-8")
    runs: dict[str, Path] = {}

    def run(family: str) -> Path:
        if family not in runs:
            out = tmp_path_factory.mktemp(f"run_{family}") / "run"
            packing = f"data.packing={str(family not in NO_PACKING).lower()}"
            train(load_config(None, tiny_run(family_dir(family), out, packing, "finetuning.lora_rank=4", data=data,
                                             max_steps=2, batch_size=2, seed=0)))
            runs[family] = out
        return runs[family]

    return run


@pytest.fixture(scope="session")
def vision_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[[str], Path]:
    """image-text family → its checkpoint folder (tests/families/vision_zoo.py), built once per session."""
    from tests.families.vision_zoo import build_vision

    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            built[family] = build_vision(family, tmp_path_factory.mktemp(f"vision_{family}"), tokenizer_dir)
        return built[family]

    return build
