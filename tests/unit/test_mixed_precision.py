"""Under bf16 autocast, one cast per activation: the same loss as plain autocast, less saved for backward."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from peftkit.config.schema import DataArgs, FinetuningArgs
from peftkit.data import build_collator, prepare_data
from peftkit.data.packing import pack_examples
from peftkit.model import prepare_for_training
from peftkit.model.value_head import hidden_states_as_logits
from peftkit.train.loss import chunked_causal_lm_loss
from peftkit.train.precision import one_cast_per_activation


def _step(model, batch, shared: bool) -> tuple[float, list[torch.Tensor], dict[str, torch.Tensor]]:
    """Loss, the distinct tensors autograd saved for backward, and gradients of one bf16-autocast step."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    model.zero_grad()
    context = one_cast_per_activation(model) if shared else nullcontext()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with (context, torch.autocast("cpu", dtype=torch.bfloat16),
          torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          hidden_states_as_logits(model.get_base_model()) as head):  # no vocabulary-sized logits: layers only
        hidden = model(**inputs).logits
    total, count = chunked_causal_lm_loss(hidden, batch["labels"], head)
    loss = total / count
    loss.backward()
    storages = {t.untyped_storage().data_ptr(): t for t in saved}.values()  # a storage saved twice counts once
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), list(storages), grads


def test_one_cast_per_activation_keeps_the_loss_and_saves_fewer_bytes(tiny_model_dir: Path, tokenizer,
                                                                       alpaca_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = prepare_for_training(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                 FinetuningArgs(finetuning_type="lora", lora_rank=4))
    model.train()
    examples = prepare_data(DataArgs(train=str(alpaca_file)), tokenizer).train.to_list()
    batch = build_collator(tokenizer, packing=True)(pack_examples(examples, 128))

    loss, saved, grads = _step(model, batch, shared=False)
    shared_loss, shared_saved, shared_grads = _step(model, batch, shared=True)

    assert shared_loss == loss  # bit-identical forward: each consumer would have cast to the same bf16 values
    tokens, width = batch["input_ids"].numel(), model.config.hidden_size

    def copies(tensors: list[torch.Tensor]) -> int:  # bf16 copies of hidden-sized activations kept for backward
        return sum(t.dtype == torch.bfloat16 and t.shape == (tokens, width) for t in tensors)

    layers = model.config.num_hidden_layers  # per layer: q/k/v + gate/up + o_proj inputs, once each
    assert (copies(saved), copies(shared_saved)) == (6 * layers, 3 * layers)
    assert sum(t.nbytes for t in shared_saved) < sum(t.nbytes for t in saved)
    assert grads.keys() == shared_grads.keys() and grads
    for name, grad in grads.items():  # gradients sum in bf16 over the consumers instead of fp32
        torch.testing.assert_close(shared_grads[name], grad, atol=2e-3, rtol=2e-2, msg=name)
    # the context leaves nothing behind: no hook, peft's input casting back on
    assert not any(m._forward_hooks for m in model.modules())
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "lora_A"))
    first = next(m for m in model.modules() if hasattr(m, "lora_A"))
    first.cast_input_dtype_enabled = False  # a user's own setting (peft.helpers.disable_input_dtype_casting)
    with one_cast_per_activation(model):
        pass
    assert first.cast_input_dtype_enabled is False  # restored as it was, not to peft's default
    first.cast_input_dtype_enabled = True
    assert _step(model, batch, shared=False)[0] == loss


def test_other_architectures_keep_autocast_casts(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with one_cast_per_activation(model):
        assert sum(bool(m._forward_hooks) for m in model.modules()) == 2 * model.config.num_hidden_layers
    model.config.model_type = "olmo2"  # its post-attention norm feeds the residual, not a projection
    with one_cast_per_activation(model):
        assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("bf16", [True, False])
def test_trainer_uses_it_only_with_autocast(bf16: bool, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path,
                                            alpaca_file: Path, tmp_path: Path) -> None:
    import peftkit.train.speedups as speedups_module
    from peftkit.config import load_config
    from peftkit.train.run import train

    used = []
    real = speedups_module.one_cast_per_activation
    monkeypatch.setattr(speedups_module, "one_cast_per_activation",
                        lambda model: used.append(model.config.model_type) or real(model))
    result = train(load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train={alpaca_file}",
                                      f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                                      "train.disable_tqdm=true", f"train.bf16={str(bf16).lower()}",
                                      "data.packing=true"]))
    assert used == (["llama"] if bf16 else [])
    assert result.summary["train_loss"] > 0
    assert not any(m._forward_hooks for m in result.model.modules())


def test_cpu_training_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, alpaca_file: Path,
                                         tmp_path: Path) -> None:
    import peftkit.train.run as run_module
    from peftkit.config import load_config
    from peftkit.train.allocator import keep_freed_memory

    assert keep_freed_memory()  # this machine's libc is glibc: both mallopt calls succeed
    monkeypatch.setenv("PEFTKIT_DEFAULT_MALLOC", "1")
    assert not keep_freed_memory()
    calls = []
    monkeypatch.setattr(run_module, "keep_freed_memory", lambda: calls.append(1))
    run_module.train(load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train={alpaca_file}",
                                        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1",
                                        "train.disable_tqdm=true"]))
    assert calls == [1]


@pytest.mark.parametrize(("device", "mode", "patched"), [("cpu", "auto", True), ("meta", "auto", False),
                                                         ("meta", "on", True), ("cpu", "off", False)])
def test_cpu_measured_patches_stay_off_on_other_devices_unless_asked(device: str, mode: str, patched: bool,
                                                                     tiny_model_dir: Path) -> None:
    """auto applies the fused LoRA and the one cast where they were measured (CPU); `on` anywhere."""
    from transformers import AutoModelForCausalLM

    from peftkit.train.speedups import training_speedups

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(device)
    model = prepare_for_training(model, FinetuningArgs(finetuning_type="lora"))
    norm = model.base_model.model.model.layers[0].input_layernorm
    with training_speedups(model, mode, autocast="bfloat16", compiled=False):
        assert bool(norm._forward_hooks) == patched
    assert not norm._forward_hooks


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_weights_stored_in_bf16_train_bit_identically_and_come_back(tied: bool, tiny_model_dir: Path,
                                                                           tokenizer, alpaca_file: Path) -> None:
    """Under bf16 autocast each matmul takes the bf16 cast of its weight: stored once in bf16, the loss and every
    LoRA gradient are the same bits; the float32 weights (the very tensors) are back after, the output layer and the
    embeddings it may share never cast."""
    from transformers import AutoModelForCausalLM

    from peftkit.train.precision import frozen_projections_in

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if tied:  # SmolLM2's layout: the output layer is the embedding matrix
        base.lm_head.weight = base.model.embed_tokens.weight
    model = prepare_for_training(base, FinetuningArgs(finetuning_type="lora", lora_rank=4, lora_target="all"))
    for layer in (m for m in model.modules() if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)  # B = 0 would make A's gradient zero
    model.train()
    batch = build_collator(tokenizer, packing=True)(pack_examples(
        prepare_data(DataArgs(train=str(alpaca_file)), tokenizer).train.to_list(), 128))
    weights = {n: (p, p.data_ptr()) for n, p in model.named_parameters() if not p.requires_grad}

    def loss_and_grads(stored: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        with frozen_projections_in(model, torch.bfloat16) if stored else nullcontext() as count:
            if stored:
                assert count == 7 * model.config.num_hidden_layers  # q k v o gate up down of every layer
                assert model.get_output_embeddings().weight.dtype == torch.float32
                assert model.get_input_embeddings().weight.dtype == torch.float32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(False)
    stored_loss, stored_grads = loss_and_grads(True)
    assert torch.equal(stored_loss, loss)
    assert grads.keys() == stored_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(stored_grads[name], grad), name
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p is weights[name][0] and p.data_ptr() == weights[name][1] and p.dtype == torch.float32, name


def test_generation_inside_training_leaves_bf16_frozen_weights_unmerged(tiny_model_dir: Path) -> None:
    """Merging LoRA into bf16 weights and unmerging after would not give them back (GRPO samples every step)."""
    from transformers import AutoModelForCausalLM

    from peftkit.infer.merging import adapters_merged
    from peftkit.train.precision import frozen_projections_in

    model = prepare_for_training(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                 FinetuningArgs(finetuning_type="lora", lora_rank=4))
    for layer in (m for m in model.modules() if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    lora = [m for m in model.modules() if hasattr(m, "merged_adapters")]
    with adapters_merged(model):
        assert all(m.merged for m in lora)  # float32 weights: merged for generation
    with frozen_projections_in(model, torch.bfloat16):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with adapters_merged(model):
            assert not any(m.merged for m in lora)
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("stage", ["grpo", "dpo"])
def test_stages_that_sample_or_keep_a_reference_train_with_frozen_bf16_weights(
        stage: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 autocast on the CPU stores the frozen weights in bf16 while training runs: GRPO's sampling (the engine,
    inside the loss) and DPO's reference model run on them."""
    from contextlib import contextmanager

    import peftkit.train.speedups as speedups
    from peftkit.config import load_config
    from peftkit.train.run import train
    from tests.helpers import DPO, REPO, tiny_run

    stored, real = [], speedups.frozen_projections_in

    @contextmanager
    def counted(model, dtype):
        with real(model, dtype) as n:
            stored.append(n)
            yield n

    monkeypatch.setattr(speedups, "frozen_projections_in", counted)

    data = {"grpo": [f"data.train={REPO / 'data/resume_ner/dev.json'}", "data.format=alpaca", "data.max_samples=4",
                     "grpo.max_new_tokens=6", "grpo.num_generations=2", "grpo.rewards=[ner_json_f1]"],
            "dpo": [f"data.train={DPO}", "data.format=preference", "data.max_samples=4"]}[stage]
    result = train(load_config(None, tiny_run(tiny_model_dir, tmp_path / "run", *data, "train.bf16=true", stage=stage,
                                              cutoff_len=96, max_steps=2, batch_size=2)))
    assert stored and stored[0] > 0  # the lever ran
    assert result.summary["train_loss"] == result.summary["train_loss"]  # finite, not NaN
