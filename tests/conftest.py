"""Shared fixtures (a tiny tokenizer from tests/assets, a tiny Llama and BERT built from configs, tiny data
files) and the test tiers.

Tiers, by folder or marker: unit (tests/unit, the default), integration (tests/integration: the embedded
SmolLM2), browser (tests/browser: headless Chromium), gpu (tests/gpu: needs CUDA; skipped with that reason
elsewhere); `slow` marks the unit tests that take more than about ten seconds. `make test-fast` runs
`-m "unit and not slow"`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import ASSETS, REPO

_TIERS = ("integration", "families", "browser", "gpu", "vllm")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs two workers), each worker computes on its share of the cores, and so
    do the processes its tests start: two torch processes whose OpenMP threads each take every core contend."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        share = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = None
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO / "tests").parts
        tier = parts[0] if parts[0] in _TIERS else "unit"
        item.add_marker(tier)
        if tier == "gpu":
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="gpu tier: needs a CUDA device (none here)"))
        if tier == "vllm" and not _vllm_installed():
            item.add_marker(pytest.mark.skip(reason="vllm tier: vLLM is not installed (`make vllm` builds it)"))


def _vllm_installed() -> bool:
    """Whether the vllm tier can run; with PEFTKIT_REQUIRE_VLLM=1 (CI) a missing vLLM is an error, not a skip."""
    import os

    from peftkit.serve.vllm import find_vllm

    if find_vllm() is not None:
        return True
    if os.environ.get("PEFTKIT_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("PEFTKIT_REQUIRE_VLLM=1 but no vLLM: run `make vllm` (or set $PEFTKIT_VLLM)")
    return False

ALPACA_RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "抽取实体", "input": "高勇：男，中国国籍", "output": '{"姓名": ["高勇"], "国籍": ["中国国籍"]}'},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "You are precise."},
    {"instruction": "And now?", "input": "", "output": "7", "history": [["Add 3 and 4.", "7"]]},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple."},
    {"instruction": "Count to three.", "input": "", "output": "1, 2, 3"},
]


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return ASSETS / "tiny_tokenizer"


@pytest.fixture()
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama saved as a normal checkpoint folder, with the tiny tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture()
def alpaca_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ALPACA_RECORDS, ensure_ascii=False), encoding="utf-8")
    return path


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _private_data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test caches tokenized data in its own folder, never in the user's $PEFTKIT_HOME."""
    monkeypatch.setattr("peftkit.data.cache.peftkit_home", lambda: tmp_path / "peftkit_home")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT with the MiniLM encoder's tokenizer (pair template, token_type_ids)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from peftkit.model.resolve import embedded_encoder_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(embedded_encoder_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
