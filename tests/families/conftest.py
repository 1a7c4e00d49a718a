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
