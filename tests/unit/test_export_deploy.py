"""Handing a run over: `peftkit export --format gguf` (one GGUF file that transformers, and so llama.cpp's
layout, reads back), the model card, and `--push-to-hub` up to the network boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftkit.cli import main
from peftkit.config import load_config
from peftkit.errors import PeftkitError
from peftkit.train.run import train
from tests.helpers import tiny_run


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    import json

    from tests.conftest import ALPACA_RECORDS

    root = tmp_path_factory.mktemp("gguf")
    data = root / "train.json"
    data.write_text(json.dumps(ALPACA_RECORDS, ensure_ascii=False), encoding="utf-8")
    result = train(load_config(None, tiny_run(tiny_model_dir, root / "run", data=data, max_steps=3)))
    return root / "run", result.model


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_reads_back_with_the_runs_logits_and_template(quant: str, lora_run, tmp_path: Path) -> None:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, trained = lora_run
    out = tmp_path / "export"
    assert main(["export", "--adapter", str(run), "--out", str(out), "--format", "gguf", "--quant", quant]) == 0
    path = out / f"model-{quant}.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "export_report.json", path.name]
    fields = gguf.GGUFReader(str(path)).fields
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(tokenizer)
    assert 'PARAMETER stop "<|im_end|>"' in (out / "Modelfile").read_text()

    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                                      add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        want, got = trained.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert float((want - got).abs().max()) < (0.01 if quant == "f16" else 0.05)
    assert torch.equal(want.argmax(-1), got.argmax(-1))  # the same greedy next token at every position
    assert AutoTokenizer.from_pretrained(out, gguf_file=path.name)(
        "抽取实体 <|im_start|>user", add_special_tokens=False)["input_ids"] == tokenizer(
        "抽取实体 <|im_start|>user", add_special_tokens=False)["input_ids"]


def test_gguf_lora_adapter_rebuilds_the_trained_model(lora_run, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The adapter GGUF as llama.cpp applies it — W + (alpha / r)·B·A per named tensor, q / k rows in llama.cpp's
    order — added to the base weights here (names mapped back, rows un-permuted) gives the trained model's logits."""
    import json

    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, trained = lora_run
    out = tmp_path / "adapter"
    assert main(["export", "--adapter", str(run), "--out", str(out), "--format", "gguf-lora"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter-f32.gguf", "export_report.json"]
    reader = gguf.GGUFReader(str(out / "adapter-f32.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert alpha == json.loads((run / "adapter_config.json").read_text())["lora_alpha"]
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    assert tensors and all(name.endswith((".lora_a", ".lora_b")) for name in tensors)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    config = base.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    to_hf = {names.get_name(n, try_suffixes=(".weight",)): n for n, _ in base.named_parameters()}
    applied = 0
    with torch.no_grad():
        for name in [n for n in tensors if n.endswith(".lora_a")]:
            a, b = tensors[name], tensors[name.removesuffix("_a") + "_b"]
            delta = alpha / a.shape[0] * (b @ a)
            hf_name = to_hf[name.removesuffix(".lora_a")]
            if hf_name.endswith(("q_proj.weight", "k_proj.weight")):  # back from llama.cpp's interleaved rows
                heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
                delta = delta.reshape(heads, delta.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(delta.shape)
            base.get_parameter(hf_name).add_(torch.from_numpy(delta))
            applied += 1
    assert applied == len(tensors) // 2
    tokenizer = AutoTokenizer.from_pretrained(run)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                                      add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        want, got = trained.eval().double()(input_ids=ids).logits, base(input_ids=ids).logits
    trained.float()
    assert float((want - got).abs().max()) < 1e-4


def test_gguf_lora_refuses_what_llama_cpp_cannot_apply(lora_run, tmp_path: Path, capsys) -> None:
    import json
    import shutil

    run, _ = lora_run
    dora = tmp_path / "dora_run"
    shutil.copytree(run, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert main(["export", "--adapter", str(dora), "--out", str(tmp_path / "x"), "--format", "gguf-lora"]) == 2
    assert "DoRA" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_gguf_refuses_what_llama_cpp_cannot_run(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from peftkit.export.llamacpp import export_gguf
    from tests.helpers import MRPC, MRPC_COLUMNS

    run = tmp_path / "cls"
    train(load_config(None, tiny_run(tiny_bert_dir, run, "data.format=pairs", MRPC_COLUMNS, "data.max_samples=8",
                                     stage="cls", data=MRPC, max_steps=1)))
    with pytest.raises(PeftkitError, match="stage cls has a classifier head, which llama.cpp does not run"):
        export_gguf(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llama_cpp_generates_what_transformers_generates(lora_run, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (PyPI has only its "
                                    "source distribution for this machine; building it needs cmake and a C++ toolchain)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.export.llamacpp import export_gguf

    run, _ = lora_run
    report = export_gguf(run, tmp_path / "export", quant="f16")
    tokenizer = AutoTokenizer.from_pretrained(run)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                           add_generation_prompt=True)
    llm = llama_cpp.Llama(model_path=report.out, n_ctx=256, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cpp = [t for _, t in zip(range(8), llm.generate(ids, temp=0.0))]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "export", gguf_file=Path(report.out).name)
    hf = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None)[0, len(ids):]
    assert cpp == hf.tolist()


class _FakeHfApi:
    """Stands in for huggingface_hub.HfApi at the network boundary only: records the calls, copies the folder."""

    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
        if self.fail:
            raise self.fail
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
        self.calls.append(("upload_folder", sorted(p.name for p in Path(folder_path).iterdir()), repo_id))


def test_push_to_hub_uploads_the_checked_export_with_its_card(lora_run, tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub
    import yaml

    run, _ = lora_run
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHfApi)
    _FakeHfApi.calls = []
    out = tmp_path / "export"
    assert main(["export", "--adapter", str(run), "--out", str(out), "--push-to-hub", "me/tiny", "--private"]) == 0
    assert _FakeHfApi.calls[0] == ("create_repo", "me/tiny", "model", True, True)
    assert _FakeHfApi.calls[1][0] == "upload_folder" and _FakeHfApi.calls[1][2] == "me/tiny"
    assert {"README.md", "config.json", "model.safetensors", "export_report.json"} <= set(_FakeHfApi.calls[1][1])
    assert "pushed to https://huggingface.co/me/tiny" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert front["base_model"] == config["model"]["name_or_path"] and front["tags"] == ["peftkit", "sft", "lora"]
    assert "- LoRA: rank 8" in card and "training loss" in card and "learning_rate 0.01" in card

    _FakeHfApi.fail = OSError("401 Unauthorized")
    try:
        code = main(["export", "--adapter", str(run), "--out", str(out), "--push-to-hub", "me/tiny"])
    finally:
        _FakeHfApi.fail = None
    err = capsys.readouterr().err
    assert code == 2 and "401 Unauthorized" in err and f"The export is complete in {out}" in err
    assert (out / "model.safetensors").is_file()


def test_a_sentencepiece_style_tokenizer_is_refused_before_merging(lora_run, tmp_path: Path, monkeypatch) -> None:
    """The GGUF holds byte-level BPE vocabularies; a Metaspace / byte-fallback one (Llama 2, Mistral v0.1, Gemma)
    would tokenize differently in llama.cpp: refused with the way out, before any merging, nothing written."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from peftkit.export import llamacpp
    from peftkit.export.gguf import tokenizer_refusal

    run = tmp_path / "run"
    shutil.copytree(lora_run[0], run)
    assert tokenizer_refusal(run) is None  # the byte-level test tokenizer
    spm = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1, "a": 2, "▁": 3}, merges=[("▁", "a")], byte_fallback=True,
                               unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    spm.save(str(run / "tokenizer.json"))
    monkeypatch.setattr(llamacpp, "load_merged", lambda *a, **k: (_ for _ in ()).throw(AssertionError("merged")))
    with pytest.raises(PeftkitError, match=r"Metaspace vocabulary with byte fallback .*--format merged"):
        llamacpp.export_gguf(run, tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()
