"""The family tier: each capability peftkit claims, on a tiny random model of every family users bring, or the
clear refusal (exit 2, before any work) where a family cannot have it. `python scripts/family_table.py` runs this
tier and writes README's family × capability table from its results."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from peftkit.config import load_config
from peftkit.config.schema import DataArgs, FinetuningArgs, ModelArgs
from peftkit.data import prepare_data
from peftkit.errors import ConfigError, PeftkitError
from peftkit.export import export
from peftkit.infer.engine import Engine
from peftkit.infer.jobs import Sampling
from peftkit.model import load_model, prepare_for_training
from peftkit.model.families import stateful_layers
from peftkit.model.loading import check_family
from peftkit.train.run import train
from tests.families.zoo import FAMILIES, NO_PACKING, STATEFUL, WINDOW
from tests.helpers import REPO, assert_packed_equals_one_by_one, tiny_run

LM_FAMILIES = sorted(FAMILIES)


def _examples(tokenizer, alpaca_file: Path) -> list[dict]:
    return prepare_data(DataArgs(train=str(alpaca_file), mask="all"), tokenizer).train.to_list()


def test_the_family_table_finds_the_stateful_families(family_dir: Callable[[str], Path]) -> None:
    from transformers import AutoConfig

    configs = {f: AutoConfig.from_pretrained(family_dir(f)) for f in LM_FAMILIES}
    assert [f for f in LM_FAMILIES if stateful_layers(configs[f])] == sorted(STATEFUL)
    # the families the table calls proven for packing are exactly the tier's families whose packing test passes
    from peftkit.model.families import PACKING_PROVEN, model_type_of

    assert set(PACKING_PROVEN) == {model_type_of(configs[f]) for f in LM_FAMILIES if f not in NO_PACKING}


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_packing_equals_one_by_one_or_is_refused(family: str, family_dir: Callable[[str], Path], tokenizer,
                                                 alpaca_file: Path, record_property) -> None:
    """Packed rows give the records' own loss and gradients; a family whose layers carry state across records is
    refused before any work, and the leak that refusal prevents is shown."""
    folder = family_dir(family)
    model = load_model(ModelArgs(name_or_path=str(folder)))
    examples = _examples(tokenizer, alpaca_file)
    if family not in NO_PACKING:
        check_family(ModelArgs(name_or_path=str(folder)), packing=True)
        assert_packed_equals_one_by_one(model, tokenizer, examples, cutoff_len=128)
        record_property("capability", "yes")
        return
    why = "carry state from one token to the next" if family in STATEFUL else "attention mask without position_ids"
    with pytest.raises(ConfigError, match=rf"data.packing: {model.config.model_type} .*{why}.*Set data.packing: false"):
        check_family(ModelArgs(name_or_path=str(folder)), packing=True)
    with pytest.raises(AssertionError):  # packed anyway, the records see each other
        assert_packed_equals_one_by_one(model, tokenizer, examples, cutoff_len=128)
    record_property("capability", "refused (exit 2)")


@pytest.mark.parametrize("family", ["qwen3_5", "gpt_oss"])
def test_packing_a_family_that_leaks_exits_2_before_any_work(family: str, family_dir: Callable[[str], Path],
                                                           alpaca_file: Path, tmp_path: Path, capsys) -> None:
    from peftkit.cli import main

    out = tmp_path / "run"
    code = main(["train", *_cli_config(tmp_path, family_dir(family), alpaca_file, out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.packing" in err and "Traceback" not in err
    assert not out.exists()  # nothing written


def _cli_config(tmp_path: Path, model: Path, data: Path, out: Path) -> list[str]:
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  name_or_path: {model}\ndata:\n  train: {data}\n  packing: true\n"
                      f"train:\n  output_dir: {out}\n  max_steps: 1\n", encoding="utf-8")
    return [str(config)]


def _greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_batched_greedy_generation_equals_a_forward_without_cache(family: str, family_dir: Callable[[str], Path],
                                                                   tokenizer, record_property) -> None:
    """The engine eval, chat, serve and GRPO share: prompts sharing a prefix, lengths differing by more than the
    sliding windows, in one batch, give the greedy tokens of a plain forward over the whole sequence."""
    model = load_model(ModelArgs(name_or_path=str(family_dir(family)))).eval()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(5, 500, (10,), generator=g).tolist()
    lengths = (3, 3 + 2 * WINDOW, 7) if family in STATEFUL else (3, 3 + 2 * WINDOW, 7, 4 * WINDOW, 12)
    prompts = [prefix + torch.randint(5, 500, (n,), generator=g).tolist() for n in lengths]
    new = 6
    jobs = Engine(model, tokenizer, slots=8, max_len=80).generate(prompts, Sampling(max_new_tokens=new))
    for prompt, job in zip(prompts, jobs):
        got = job.tokens + ([job.stop_token] if job.stop_token is not None else [])
        assert got == _greedy_without_cache(model, prompt, len(got)), f"prompt of {len(prompt)} tokens"
    record_property("capability", "one row at a time" if family in STATEFUL else "yes")


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_lora_trains_and_the_merged_export_reloads_equal(family: str, family_dir: Callable[[str], Path],
                                                        family_run: Callable[[str], Path], tmp_path: Path,
                                                        record_property) -> None:
    """A LoRA run (packed where the family allows it) saves, and its merged export, checked in float64 against
    base + adapter, loads in plain transformers with the same logits (MoE experts included)."""
    from transformers import AutoModelForCausalLM

    summary = json.loads((family_run(family) / "run_summary.json").read_text())
    assert summary["train_loss"] > 0
    report = export(family_run(family), tmp_path / "merged")
    assert report.max_logit_diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == json.loads((family_dir(family) / "config.json").read_text())["architectures"][0]
    record_property("capability", "yes")


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_gguf_reads_back_or_is_refused_before_merging(family: str, family_dir: Callable[[str], Path],
                                                      family_run: Callable[[str], Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, record_property) -> None:
    """Where the GGUF writer covers the architecture (and no sliding window is lost), transformers reads the file
    back within the quantisation's limit (the check inside export_gguf); elsewhere a message before any merging."""
    from transformers import AutoConfig

    from peftkit.export import llamacpp
    from peftkit.model.families import gguf_refusal

    refusal = gguf_refusal(AutoConfig.from_pretrained(family_dir(family)))
    if refusal is None:
        report = llamacpp.export_gguf(family_run(family), tmp_path / "gguf", quant="f16")
        assert report.max_logit_diff < llamacpp.GGUF_MAX_LOGIT_DIFF["f16"]
        record_property("capability", "yes")
        return

    def no_merging(*a, **k):
        raise AssertionError("merged before the refusal")

    monkeypatch.setattr(llamacpp, "load_merged", no_merging)
    with pytest.raises(PeftkitError, match=r"--format gguf: .*(not written here|sliding window|reader, which checks)"):
        llamacpp.export_gguf(family_run(family), tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()
    reason = ("sliding window" if "sliding" in refusal else refusal.split(" has ")[1].split(";")[0] if " assumes " in refusal
              else "architecture")
    record_property("capability", f"refused: {reason}")


@pytest.mark.parametrize("family", LM_FAMILIES)
@pytest.mark.parametrize("kind", ["freeze", "full"])
def test_freeze_and_full_tuning_train_the_right_parameters(family: str, kind: str, family_dir: Callable[[str], Path],
                                                           record_property) -> None:
    model = load_model(ModelArgs(name_or_path=str(family_dir(family))))
    model = prepare_for_training(model, FinetuningArgs(finetuning_type=kind, freeze_trainable_layers=1))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if kind == "full":  # all of it; an image-text model's vision tower and projector stay frozen by default
        from peftkit.model.families import vision_parts

        vision = [m + "." for parts in vision_parts(model) for m in parts]
        assert trainable == [n for n, _ in model.named_parameters() if not n.startswith(tuple(vision))] and trainable
    else:  # the last decoder layer only, whatever the family calls its layers (GPT-2: transformer.h.N)
        last = model.config.get_text_config().num_hidden_layers - 1
        assert trainable and all(f".{last}." in n for n in trainable)
    ids = torch.randint(5, 500, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad and p.grad is not None)
    record_property("capability", "yes")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_lora_all_reaches_the_moe_experts(family: str, family_dir: Callable[[str], Path]) -> None:
    model = prepare_for_training(load_model(ModelArgs(name_or_path=str(family_dir(family)))), FinetuningArgs(lora_rank=4))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".experts." in n and "lora_" in n for n in trained)


def test_gpt2_lora_is_made_for_its_transposed_projections(family_dir: Callable[[str], Path]) -> None:
    model = load_model(ModelArgs(name_or_path=str(family_dir("gpt2"))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prepare_for_training(model, FinetuningArgs(lora_rank=4))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert model.peft_config["default"].fan_in_fan_out is True


@pytest.mark.parametrize(("family", "leaks"), [("llama", False), ("gpt_oss", True), ("lfm2", True)])
def test_a_family_the_tier_has_not_run_is_checked_on_the_model_itself(
        family: str, leaks: bool, family_dir: Callable[[str], Path], alpaca_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the family tables emptied (as for a family they do not name), the check before training refuses packing
    where a packed record's logits move with its neighbour, and lets the others train."""
    from peftkit.model import families

    monkeypatch.setattr(families, "PACKING_PROVEN", ())
    monkeypatch.setattr(families, "PACKING_LEAKS", {})
    monkeypatch.setattr(families, "STATEFUL_LAYER_TYPES", ())
    cfg = load_config(None, tiny_run(family_dir(family), tmp_path / "run", "data.packing=true", data=alpaca_file,
                                     max_steps=1, batch_size=2))
    if not leaks:
        assert train(cfg).summary["train_loss"] > 0
        return
    with pytest.raises(ConfigError, match=r"a packed record's logits change with the record before it"):
        train(cfg)


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "mixtral"])
def test_chat_serve_and_eval_load_the_runs_own_base(family: str, family_dir: Callable[[str], Path],
                                                    family_run: Callable[[str], Path], tmp_path: Path, capsys) -> None:
    """`--adapter RUN` loads the base the run trained on (adapter_config.json), not the embedded model: alone, and
    with an eval config that names no model (export reads the run's base too: the export test above)."""
    from peftkit.cli import main
    from peftkit.cli.models import _run_spec
    from peftkit.serve import load_served

    run = family_run(family)
    assert main(["chat", "--adapter", str(run), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    data = tmp_path / "dev.json"
    data.write_text(json.dumps([{"instruction": "Say hello.", "input": "", "output": "Hello!"}]))
    assert main(["eval", str(REPO / "examples/resume_ner_lora.yaml"), f"eval.dataset={data}", "eval.metrics=[exact_match]",
                 "generate.max_new_tokens=2", "--adapter", str(run), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "predict_results.json").is_file()
    model, _, served = load_served(_run_spec([str(run)]))
    expected = json.loads((family_dir(family) / "config.json").read_text())["architectures"][0]
    assert type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__ == expected
    assert list(served) == ["run"]


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_speedups_auto_equal_off(family: str, family_dir: Callable[[str], Path], tokenizer, alpaca_file: Path,
                                 record_property) -> None:
    """train.peftkit_speedups auto (the fused LoRA, the chunked loss where the family's output layer allows it)
    gives the loss and gradients of the libraries' own code (off), on a LoRA model with a non-zero update."""
    from peftkit.data import build_collator
    from peftkit.data.packing import pack_examples
    from peftkit.model.value_head import causal_lm, hidden_states_as_logits
    from peftkit.train.loss import chunked_causal_lm_loss, supports_chunked_loss
    from peftkit.train.speedups import training_speedups

    torch.manual_seed(0)
    model = prepare_for_training(load_model(ModelArgs(name_or_path=str(family_dir(family)))), FinetuningArgs(lora_rank=4))
    for layer in (m for m in model.modules() if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    examples = _examples(tokenizer, alpaca_file)
    packing = family not in NO_PACKING
    batch = build_collator(tokenizer, packing=packing)(pack_examples(examples, 128) if packing else examples)
    model.train()

    def loss_and_grads(speedups: str) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks (GPT-2 trains with dropout)
        with training_speedups(model, speedups, autocast=None, compiled=False):
            lm = causal_lm(model)
            if speedups == "auto" and supports_chunked_loss(lm):
                with hidden_states_as_logits(lm) as head:
                    hidden = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                total, count = chunked_causal_lm_loss(hidden, batch["labels"], head)
                loss = total / count
            else:
                loss = model(**batch).loss
            loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    off, off_grads = loss_and_grads("off")
    auto, auto_grads = loss_and_grads("auto")
    assert auto == pytest.approx(off, abs=1e-5)
    assert off_grads.keys() == auto_grads.keys() and off_grads
    for name, grad in off_grads.items():
        torch.testing.assert_close(auto_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    from peftkit.model.families import transposed_projections
    from peftkit.train.fused_lora import _plain

    fused = sum(1 for m in model.modules() if _plain(m))  # the comparison runs a patched path, not the same code twice
    assert fused > 0 or transposed_projections(model)
    chunked = supports_chunked_loss(causal_lm(model))
    record_property("capability", "nothing patched (Conv1D)" if not fused and not chunked
                    else "yes, chunked loss" if chunked else "yes")


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_one_dpo_step(family: str, family_dir: Callable[[str], Path], tmp_path: Path, record_property) -> None:
    from tests.helpers import DPO

    summary = train(load_config(None, tiny_run(family_dir(family), tmp_path / "dpo", "finetuning.lora_rank=4",
                                               "data.format=preference", "data.max_samples=4", data=DPO, stage="dpo", max_steps=1,
                                               batch_size=2))).summary
    assert summary["train_loss"] == pytest.approx(0.6931, abs=0.05)  # log 2 at the start: the policy is the reference
    record_property("capability", "yes")


def test_freeze_counts_the_language_models_layers_of_an_image_text_model(family_dir: Callable[[str], Path]) -> None:
    """Gemma 3 image-text: the vision tower's layer 0 is never "one of the last layers" of the language model."""
    model = load_model(ModelArgs(name_or_path=str(family_dir("gemma3_vl"))))
    model = prepare_for_training(model, FinetuningArgs(finetuning_type="freeze", freeze_trainable_layers=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n for n in trainable)
    assert any(".layers.0." in n for n in trainable)  # every language layer, the vision tower's layer 0 not


@pytest.mark.parametrize(("family", "published"), [
    ("qwen3", {"head_dim": 128}),  # 4 heads x 128 over hidden 64: 0.6B's heads do not span its hidden size either
    ("qwen3_moe", {"moe_intermediate_size": 768, "norm_topk_prob": True}),
    ("gemma2", {"head_dim": 256}),  # Gemma 2 2B / 9B: head_dim = the query scale's 256; window 8 (zoo.WINDOW)
    ("gemma3", {"head_dim": 256, "num_hidden_layers": 6,  # Gemma 3 1B's 5:1 pattern, window 8
                "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}),
])
def test_gguf_with_the_published_values_the_reader_assumes_reads_back(family: str, published: dict,
                                                                     tokenizer_dir: Path, alpaca_file: Path,
                                                                     tmp_path: Path, record_property) -> None:
    """Qwen3 / Qwen3-MoE / Gemma 2 / Gemma 3 at their published head size / expert width / layer pattern (what
    transformers' GGUF reader assumes): written (experts stacked into llama.cpp's gate / up / down tensors; Gemma's
    norms offset by one, its window and soft-caps in the metadata) and read back within the f16 limit by
    export_gguf's own check, on prompts longer than the window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.export.llamacpp import GGUF_MAX_LOGIT_DIFF, export_gguf
    from tests.families.zoo import config_of

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = config_of(family, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    for key, value in published.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    train(load_config(None, tiny_run(tmp_path / "base", run, "finetuning.lora_rank=4", data=alpaca_file, max_steps=1,
                                     batch_size=2)))
    report = export_gguf(run, tmp_path / "gguf", quant="f16")
    assert report.max_logit_diff < GGUF_MAX_LOGIT_DIFF["f16"]
    record_property("capability", "yes at " + ", ".join(f"{k} {v}" for k, v in published.items() if k != "layer_types"))


@pytest.mark.parametrize(("model_type", "values", "refused"), [
    ("gemma2", {}, None),  # Gemma 2 2B / 9B as published
    ("gemma2", {"head_dim": 128, "query_pre_attn_scalar": 144}, "head_dim 128"),  # Gemma 2 27B
    ("gemma3_text", {"num_hidden_layers": 26, "sliding_window": 512}, None),  # Gemma 3 1B
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
     "rope_parameters"),  # Gemma 3 4B+: linear rope scaling the reader does not read
    ("gemma3_text", {"num_hidden_layers": 4, "sliding_window_pattern": 2}, "layer_types"),
    ("mistral", {"sliding_window": 4096, "max_position_embeddings": 32768}, "sliding window"),
])
def test_gguf_refuses_what_the_file_or_its_check_cannot_carry(model_type: str, values: dict, refused: str | None) -> None:
    """Gemma's windows are carried (llama.cpp's gemma graphs apply them); Mistral's is not (its llama graph); what
    transformers' reader would rebuild from the class defaults must be those defaults, or the file is refused."""
    from transformers import AutoConfig

    from peftkit.model.families import gguf_refusal

    config = AutoConfig.for_model(model_type, **values)
    config.architectures = [{"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                             "mistral": "MistralForCausalLM"}[model_type]]
    refusal = gguf_refusal(config)
    if refused is None:
        assert refusal is None
    else:
        assert refusal is not None and refused in refusal and "--format merged" in refusal
