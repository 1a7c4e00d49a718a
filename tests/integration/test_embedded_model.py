"""End to end on the embedded SmolLM2-135M-Instruct: train through the CLI, reload in plain peft, chat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit.train.run as run_module
from peftkit.cli import main
from peftkit.model import ensure_embedded_model
from tests.helpers import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("embedded") / "run"
    captured = {}
    real_train = run_module.train

    def keep_result(cfg, **kwargs):
        captured["result"] = real_train(cfg, **kwargs)
        return captured["result"]

    run_module.train = keep_result
    try:
        code = main([
            "train", str(REPO / "examples/resume_ner_lora.yaml"), f"train.output_dir={out}",
            "train.max_steps=8", "train.per_device_train_batch_size=4", "train.logging_steps=1",
            "train.warmup_steps=0", "train.train_sampling_strategy=sequential", "train.disable_tqdm=true",
            "data.max_samples=32", "data.cutoff_len=256", f"data.train={REPO / 'data/resume_ner/train.json'}",
            "eval.dataset=",
        ])
    finally:
        run_module.train = real_train
    assert code == 0
    return out, captured["result"].model


def test_loss_falls_and_log_is_well_formed(trained) -> None:
    out, _ = trained
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    logs = [r for r in rows if r["event"] == "log"]
    assert [r["current_steps"] for r in logs] == list(range(1, 9))
    losses = [r["loss"] for r in logs]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    for r in logs:
        assert isinstance(r["loss"], float) and isinstance(r["learning_rate"], float)
        assert isinstance(r["epoch"], float) and isinstance(r["elapsed_time"], str) and r["total_steps"] == 8
    assert (out / "training_loss.png").stat().st_size > 1000


def test_adapter_reloads_in_plain_peft_with_equal_logits(trained) -> None:
    from peft import AutoPeftModelForCausalLM

    out, model = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(ensure_embedded_model())
    base_config = json.loads((ensure_embedded_model() / "config.json").read_text())
    assert "quantization_config" not in base_config and base_config["model_type"] == "llama"
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    model.eval()
    ids = torch.tensor([[1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_chat_with_the_adapter_answers_and_stops(trained) -> None:
    out, _ = trained
    proc = subprocess.run(
        [sys.executable, "-m", "peftkit", "chat", "--adapter", str(out), "--max-new-tokens", "40",
         "--prompt", "抽取简历句子中的实体，类型为：姓名、国籍、种族、职位、教育背景、专业、组织名、地名。"
         "以JSON格式回答，没有实体时回答{}。\n张三，中国国籍。"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    answer = proc.stdout.strip()
    assert answer and "<|im_end|>" not in answer and "assistant" not in answer


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_embedded_model()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def test_labels_conform_to_apply_chat_template_on_the_embedded_tokenizer(smollm) -> None:
    from peftkit.data import encode_messages
    from tests.helpers import MESSAGES, SINGLE, expected_labels

    _, tokenizer = smollm
    for messages in (SINGLE, MESSAGES):
        example, _ = encode_messages(tokenizer, messages, 1024, ("f", 0))
        assert example["input_ids"] == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        assert example["labels"] == expected_labels(tokenizer, messages, turns)


def test_packed_loss_and_gradients_equal_one_by_one_on_the_embedded_model(smollm) -> None:
    from peftkit.config.schema import DataArgs
    from peftkit.data import prepare_data
    from tests.helpers import assert_packed_equals_one_by_one

    model, tokenizer = smollm
    data = prepare_data(DataArgs(train=str(REPO / "data/resume_ner/dev.json"), max_samples=6, cutoff_len=256), tokenizer)
    assert_packed_equals_one_by_one(model, tokenizer, data.train.to_list(), cutoff_len=256)
