"""QLoRA on CPU (bitsandbytes' CPU backend): config errors before loading, a 4-bit / 8-bit base that trains,
saves only the adapter, resumes exactly, evaluates, and exports merged into the unquantized base;
peftkit's own layer patches are proven on, or kept off, quantized layers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.config import load_config
from peftkit.config.schema import FinetuningArgs, ModelArgs
from peftkit.errors import ConfigError, PeftkitError
from peftkit.export import export
from peftkit.model import count_parameters, load_model, prepare_for_training
from peftkit.model.quantization import estimate_memory, is_quantized
from peftkit.train.preflight import preflight
from peftkit.train.run import train
from tests.helpers import tiny_run

pytest.importorskip("bitsandbytes", reason="the quantization extra (bitsandbytes) is part of the test extra")


def _config(tiny_model_dir: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={tiny_model_dir}", "train.output_dir=x", "model.quantization_bit=4", *extra]


@pytest.mark.parametrize(("extra", "match"), [
    (["model.quantization_bit=3"], r"model.quantization_bit=3: must be 4 \(QLoRA: nf4 / fp4\) or 8"),
    (["finetuning.finetuning_type=full"], r"only LoRA trains on a quantized base"),
    (["finetuning.finetuning_type=freeze"], r"set finetuning.finetuning_type: lora, or drop the key for freeze"),
])
def test_config_errors_before_any_model_loads(tiny_model_dir: Path, extra: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        preflight(load_config(None, _config(tiny_model_dir, *extra)))


def test_missing_bitsandbytes_says_what_to_install(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'peftkit\[quantization\]'"):
        preflight(load_config(None, _config(tiny_model_dir)))


def _prequantized_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "gptq_model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_prequantized_checkpoint_with_quantization_bit_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is already quantized \(gptq\); drop model.quantization_bit"):
        preflight(load_config(None, _config(_prequantized_copy(tiny_model_dir, tmp_path))))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_gets_lora_on_its_quantized_linears(tiny_model_dir: Path, bits: int) -> None:
    import bitsandbytes as bnb

    model = load_model(ModelArgs(name_or_path=str(tiny_model_dir), quantization_bit=bits))
    assert is_quantized(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    assert type(model.lm_head) is torch.nn.Linear  # the output layer stays a plain Linear (bitsandbytes skips it)
    plain = load_model(ModelArgs(name_or_path=str(tiny_model_dir)))
    assert count_parameters(model)[1] == count_parameters(plain)[1]  # 4-bit values counted, not packed bytes
    model = prepare_for_training(model, FinetuningArgs(lora_rank=4), gradient_checkpointing=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 100, (2, 12))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if p.requires_grad)


def test_peftkit_layer_patches_on_a_quantized_base(tiny_model_dir: Path, tokenizer, alpaca_file: Path) -> None:
    """The fused LoRA update touches plain nn.Linear bases only; the chunked loss reads the (unquantized)
    output layer and equals the standard loss and gradients on a 4-bit base; merging for generation is skipped."""
    from peftkit.config.schema import DataArgs
    from peftkit.data import build_collator, prepare_data
    from peftkit.infer.merging import adapters_merged
    from peftkit.model.value_head import hidden_states_as_logits
    from peftkit.train.fused_lora import fused_lora_forward
    from peftkit.train.loss import chunked_causal_lm_loss, supports_chunked_loss

    torch.manual_seed(0)
    model = prepare_for_training(load_model(ModelArgs(name_or_path=str(tiny_model_dir), quantization_bit=4)),
                                 FinetuningArgs(lora_rank=4))
    with fused_lora_forward(model) as fused:
        assert fused == 0
    for layer in (m for m in model.modules() if hasattr(m, "lora_B")):  # a non-zero update, so the check can fail
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    batch = dict(build_collator(tokenizer, packing=False)(
        prepare_data(DataArgs(train=str(alpaca_file)), tokenizer).train.to_list()))
    assert supports_chunked_loss(model.get_base_model())
    model.zero_grad()
    standard = model(**batch).loss
    standard.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with hidden_states_as_logits(model.get_base_model()) as head:
        hidden = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    total, count = chunked_causal_lm_loss(hidden, batch["labels"], head, chunk=7)
    (total / count).backward()
    assert (total / count).item() == pytest.approx(standard.item(), abs=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4, msg=name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with adapters_merged(model):
        assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_4bit_base_trains_the_same_after_an_evaluation(tokenizer_dir: Path, tmp_path: Path) -> None:
    """bitsandbytes repacks a 4-bit layer for its bf16 CPU kernel in an eval forward on CPUs with AVX512-BF16, and
    that kernel has no backward; peftkit keeps one layout on every CPU. Widths 64 / 128 are ones the repack accepts,
    so this checks the training after an evaluation, not the width rule the tiny model (hidden 32) hit."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = load_model(ModelArgs(name_or_path=str(tmp_path / "base"), quantization_bit=4))
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    model = prepare_for_training(model, FinetuningArgs(lora_rank=4))
    for layer in (m for m in model.modules() if hasattr(m, "lora_B")):  # gradients reach lora_A too
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    ids = torch.randint(0, 100, (2, 12))

    def step() -> tuple[float, dict[str, torch.Tensor]]:
        model.train()
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = step()
    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(loss, abs=1e-6)  # the same computation
    again, grads_again = step()
    assert again == loss
    for name, grad in grads.items():
        torch.testing.assert_close(grads_again[name], grad, rtol=0, atol=0, msg=name)


def _qlora(tiny_model_dir: Path, alpaca_file: Path, out: Path, *extra: str) -> dict:
    return train(load_config(None, tiny_run(tiny_model_dir, out, "model.quantization_bit=4", *extra, data=alpaca_file,
                                            max_steps=4, batch_size=2, seed=0))).summary


@pytest.mark.slow
def test_qlora_run_saves_the_adapter_resumes_exactly_and_exports_unquantized(
        tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    saving = ("train.save_strategy=steps", "train.save_steps=2")
    whole = tmp_path / "whole"
    summary = _qlora(tiny_model_dir, alpaca_file, whole, *saving, f"eval.dataset={alpaca_file}", "eval.max_samples=2",
                     "generate.max_new_tokens=4")
    assert summary["metrics_after"]["records"] == 2  # evaluated after training, on the 4-bit base + adapter
    saved = {p.name for p in whole.iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved  # never the quantized base
    logged = [json.loads(line) for line in (whole / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in logged if r["event"] == "log"] == [1, 2, 3, 4]
    assert json.loads((whole / "training_args.json").read_text())["gradient_checkpointing"] is True  # QLoRA's default

    # Stopped after checkpoint-2, resumed: the same adapter as the uninterrupted run.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    _qlora(tiny_model_dir, alpaca_file, resumed, *saving, "train.resume_from_checkpoint=true")
    expected = load_file(whole / "adapter_model.safetensors")
    for name, weight in load_file(resumed / "adapter_model.safetensors").items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6, msg=name)

    # Export: merged into the unquantized base, checked in float64 against base + adapter, plain transformers loads it.
    report = export(whole, tmp_path / "merged")
    assert report.max_logit_diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not is_quantized(merged) and merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_qlora_best_model_at_end(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "best"
    summary = _qlora(tiny_model_dir, alpaca_file, out, "data.val_size=2", "train.eval_strategy=steps",
                     "train.eval_steps=2", "train.save_strategy=steps", "train.save_steps=2",
                     "train.load_best_model_at_end=true")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] and (out / "adapter_model.safetensors").is_file()
    assert summary["output_dir"] == str(out)


def test_memory_estimate_of_a_llama3_8b_config(tmp_path: Path) -> None:
    # Llama-3-8B's published shape: 8.03B parameters, 6.98B of them in the decoder's linear layers.
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": False}))
    bf16 = estimate_memory(ModelArgs(name_or_path=str(tmp_path), dtype="bfloat16"))
    nf4 = estimate_memory(ModelArgs(name_or_path=str(tmp_path), quantization_bit=4))
    int8 = estimate_memory(ModelArgs(name_or_path=str(tmp_path), quantization_bit=8))
    assert bf16.parameters == nf4.parameters == 8_030_261_248 and nf4.quantized == 6_979_321_856
    assert bf16.weight_bytes == 2 * 8_030_261_248
    gib = 2**30
    assert (round(bf16.weight_bytes / gib, 2), round(nf4.weight_bytes / gib, 2), round(int8.weight_bytes / gib, 2)) == \
        (14.96, 7.27, 10.42)  # embeddings and head (1.05B) stay in float32 after peft's k-bit preparation
    assert "4-bit nf4 + double quantization" in nf4.line()


def test_prequantized_checkpoints_load_as_they_are(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    """A bnb 4-bit checkpoint trains LoRA as it is; a GPTQ one without its library is an error naming it."""
    from peftkit.errors import ModelError

    saved = tmp_path / "nf4_model"
    load_model(ModelArgs(name_or_path=str(tiny_model_dir), quantization_bit=4)).save_pretrained(saved)
    shutil.copy(tiny_model_dir / "tokenizer.json", saved)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", saved)
    shutil.copy(tiny_model_dir / "chat_template.jinja", saved)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    run = tmp_path / "run"
    train(load_config(None, tiny_run(saved, run, data=alpaca_file, max_steps=2, batch_size=2)))
    assert (run / "adapter_model.safetensors").is_file()
    assert json.loads((run / "training_args.json").read_text())["gradient_checkpointing"] is True
    with pytest.raises(PeftkitError, match=r"is a quantized checkpoint \(bitsandbytes\)"):
        export(run, tmp_path / "merged")
    with pytest.raises(ModelError, match=r"needs a package that is not installed"):
        load_model(ModelArgs(name_or_path=str(_prequantized_copy(tiny_model_dir, tmp_path))))
