"""FSDP2 and DeepSpeed ZeRO-2 / 3 train for real (one GPU, torchrun world size 1): save, evaluate, keep the best,
resume after SIGKILL to the uninterrupted result, export. The multi-process logic is proven on CPUs
(tests/unit/test_distributed.py); accelerate runs FSDP on accelerators only (train/run.py's FSDP_ON_CPU)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO

FSDP2 = ["train.fsdp=true", "train.fsdp_config={version: 2, auto_wrap_policy: TRANSFORMER_BASED_WRAP, "
         "transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}"]
ENGINES = {"fsdp2": FSDP2, "zero2": [f"train.deepspeed={REPO}/examples/deepspeed_zero2.json"],
           "zero3": [f"train.deepspeed={REPO}/examples/deepspeed_zero3.json"],
           "zero3_offload": [f"train.deepspeed={REPO}/examples/deepspeed_zero3_offload.json"]}


def _launch(tmp_path: Path, model: Path, out: Path, engine: str, tuning: str, fault: str = "none",
            *extra: str) -> subprocess.CompletedProcess:
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (benchmarks/fetch_gpu_wheels.sh builds it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data.json"
    if not data.exists():
        data.write_text(json.dumps(json.loads((REPO / "data/demo/alpaca_en_demo.json").read_text())[:64]))
    config = tmp_path / "config.yaml"
    config.write_text(f"finetuning: {{finetuning_type: {tuning}}}\n")
    args = [str(config), f"model.name_or_path={model}", f"data.train={data}", "data.cutoff_len=128", "data.val_size=8",
            f"train.output_dir={out}", "train.max_steps=4", "train.per_device_train_batch_size=4",
            "train.learning_rate=1e-3", "train.logging_steps=1", "train.seed=0", "train.bf16=true",
            "train.disable_tqdm=true", "train.save_strategy=steps", "train.save_steps=2", "train.eval_strategy=steps",
            "train.eval_steps=2", "train.load_best_model_at_end=true", *ENGINES[engine], *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", f"--master-port={port}",
           str(REPO / "tests/assets/fault_train.py"), fault, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240, check=False,
                          env={**os.environ, "PEFTKIT_HOME": str(tmp_path / "home")})


def _weights(out: Path, tuning: str) -> dict[str, torch.Tensor]:
    return load_file(out / ("adapter_model.safetensors" if tuning == "lora" else "model.safetensors"))


@pytest.mark.parametrize(("engine", "tuning"), [("fsdp2", "lora"), ("zero2", "lora"), ("zero3", "lora"),
                                                ("zero3_offload", "lora"), ("fsdp2", "full"), ("zero3", "full")])
def test_engine_trains_saves_resumes_after_sigkill_and_exports(engine: str, tuning: str, wide_model_dir: Path,
                                                               tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    done = _launch(tmp_path, wide_model_dir, whole, engine, tuning)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (whole / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in rows if r["event"] == "eval"] == [2, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["event"] == "log")
    killed = tmp_path / "killed"
    first = _launch(tmp_path, wide_model_dir, killed, engine, tuning, "kill_in_step:4")
    assert first.returncode != 0 and (killed / "checkpoint-2").is_dir()
    again = _launch(tmp_path, wide_model_dir, killed, engine, tuning, "none", "train.resume_from_checkpoint=true")
    assert again.returncode == 0, again.stderr[-3000:]
    want, got = _weights(whole, tuning), _weights(killed, tuning)
    assert want.keys() == got.keys()
    for name in want:  # bf16 compute: equal to bf16 rounding, not bit-exact
        torch.testing.assert_close(got[name].float(), want[name].float(), atol=2e-3, rtol=2e-2, msg=name)
    exported = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "peftkit", "export", "--adapter", str(whole), "--out", str(exported)],
                          capture_output=True, text=True, cwd=REPO, timeout=240, check=False,
                          env={**os.environ, "PEFTKIT_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(exported)  # loads in plain transformers
    shutil.rmtree(tmp_path / "home", ignore_errors=True)
