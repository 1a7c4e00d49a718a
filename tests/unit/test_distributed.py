"""Two processes (torchrun, gloo on CPU) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.config import load_config
from peftkit.train.run import train
from tests.helpers import REPO


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "log"]


def _single_process(tiny_model_dir: Path, tmp_path: Path, max_steps: int, save_steps: int) -> tuple[list[str], Path]:
    """The overrides every launch shares, and the output of one process with global batch 4 under them."""
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train={REPO / 'data/demo/alpaca_en_demo.json'}",
              "data.max_samples=48", "data.cutoff_len=128", f"train.max_steps={max_steps}", "train.logging_steps=1",
              "train.learning_rate=1e-2", "train.seed=0", "train.disable_tqdm=true", "train.save_strategy=steps",
              f"train.save_steps={save_steps}"]
    single = tmp_path / "single"
    train(load_config(None, [*common, f"train.output_dir={single}", "train.per_device_train_batch_size=4"]))
    return common, single


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    common, single = _single_process(tiny_model_dir, tmp_path, max_steps=5, save_steps=5)

    config = tmp_path / "config.yaml"
    config.write_text("finetuning: {finetuning_type: lora}\n")
    ddp = tmp_path / "ddp"
    env = {**os.environ, "PEFTKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", "--nproc", "2", str(config), *common, f"train.output_dir={ddp}",
         "train.per_device_train_batch_size=2"],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("tokenized data from the cache") == 1  # rank 1 read what rank 0 prepared
    assert proc.stdout.count("training loss:") == 1  # only rank 0 reports

    assert _losses(ddp) == pytest.approx(_losses(single), abs=1e-4)
    rows = [json.loads(line) for line in (ddp / "trainer_log.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "train_begin" and rows[0]["world_size"] == 2
    assert sum(r["event"] == "train_begin" for r in rows) == 1  # one writer
    a, b = load_file(ddp / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    for name, weight in a.items():
        # 1e-4 on weights of ~0.2: two processes multiply 2 rows where one multiplies 4, so their matmuls and
        # the chunked loss round differently, and Adam at lr 1e-2 magnifies that over 5 steps (up to 3e-5
        # measured). A batch seen twice or skipped moves them by far more: each Adam step moves a weight by up to lr.
        torch.testing.assert_close(weight, b[name], rtol=0, atol=1e-4, msg=name)


def _two_nodes(tmp_path: Path, common: list[str], out: Path, fault: str = "none",
               *extra: str) -> list[tuple[int, str, str]]:
    """`peftkit train --nnodes 2 --node-rank R --master-addr 127.0.0.1` for R = 0, 1 (one gloo process each,
    one shared $PEFTKIT_HOME); node 1 runs with `fault` injected (tests/assets/fault_train.py under torchrun).
    (returncode, stdout, stderr) of each node."""
    import socket

    config = tmp_path / "config.yaml"
    config.write_text("finetuning: {finetuning_type: lora}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = ["--nnodes=2", "--master-addr=127.0.0.1", f"--master-port={port}"]
    args = [str(config), *common, f"train.output_dir={out}", "train.per_device_train_batch_size=2", *extra]
    env = {**os.environ, "PEFTKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    commands = [[sys.executable, "-m", "peftkit", "train", *nodes, "--node-rank=0", *args],
                [sys.executable, "-m", "torch.distributed.run", *nodes, "--node-rank=1", "--nproc_per_node=1",
                 str(REPO / "tests/assets/fault_train.py"), fault, *args]]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for c in commands]
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_one_process_and_resume_after_a_node_dies(tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """Two nodes on 127.0.0.1 train like one process with the same global batch; when node 1's process is
    SIGKILLed at step 5, node 0 stops at once naming the checkpoint and the command that resumes it, and
    both nodes started again finish with the adapter of the uninterrupted run."""
    common, single = _single_process(tiny_model_dir, tmp_path, max_steps=6, save_steps=2)

    whole = tmp_path / "whole"
    (rc0, out0, err0), (rc1, out1, err1) = _two_nodes(tmp_path, common, whole)
    assert (rc0, rc1) == (0, 0), err0[-2000:] + err1[-2000:]
    assert out0.count("training loss:") == 1 and "training loss:" not in out1  # only global rank 0 reports
    assert _losses(whole) == pytest.approx(_losses(single), abs=1e-4)
    rows = [json.loads(line) for line in (whole / "trainer_log.jsonl").read_text().splitlines()]
    assert rows[0]["world_size"] == 2 and sum(r["event"] == "train_begin" for r in rows) == 1

    run = tmp_path / "run"
    started = time.time()
    (rc0, _, err0), (rc1, _, _) = _two_nodes(tmp_path, common, run, "kill_in_step:5")
    assert rc0 == 1 and rc1 != 0 and time.time() - started < 120  # no hang: gloo sees the peer go at once
    assert "another process of this run stopped" in err0 and f"the last complete checkpoint is {run / 'checkpoint-4'}" in err0
    assert "Start every node again with: peftkit train --nnodes=2 --node-rank=0 --master-addr=127.0.0.1" in err0
    (rc0, _, err0), (rc1, _, err1) = _two_nodes(tmp_path, common, run, "none", "train.resume_from_checkpoint=true")
    assert (rc0, rc1) == (0, 0), err0[-2000:] + err1[-2000:]
    expected = load_file(whole / "adapter_model.safetensors")
    for name, weight in load_file(run / "adapter_model.safetensors").items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6, msg=name)
    assert _losses(run) == pytest.approx(_losses(whole), abs=1e-6)


def test_fsdp_on_cpus_is_refused_instead_of_silently_running_ddp(tiny_model_dir: Path, tmp_path: Path) -> None:
    """accelerate 1.15 enables FSDP only for accelerator process groups: on CPUs (gloo) `fsdp: true` would train
    plain DDP (measured: Trainer.is_fsdp_enabled False, the model wrapped in DistributedDataParallel). Exit 2 instead."""
    out = tmp_path / "fsdp"
    proc = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(REPO / "examples/fsdp_lora.yaml"), f"model.name_or_path={tiny_model_dir}",
         f"train.output_dir={out}", "data.max_samples=8"],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "FSDP runs on GPUs" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "trainer_log.jsonl").exists()


def test_the_slurm_example_starts_one_peftkit_launch_per_node_with_its_rank(tmp_path: Path) -> None:
    """examples/slurm/train_multinode.sbatch under stand-ins for srun / scontrol / peftkit: the command each node runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        # more host names than a pipe holds: a reader that stops at the first line would SIGPIPE the script
        "scontrol": "seq -f 'gpu-node-%02g' 7 30000",
        # srun runs its command once per node, as SLURM sets SLURM_NODEID for each task
        "srun": 'shift; for n in 0 1; do SLURM_NODEID=$n "$@"; done',
        "peftkit": f'echo "$*" >> {tmp_path}/launches.txt',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "PEFTKIT_HOME": str(tmp_path / "home")}
    proc = subprocess.run(["bash", str(REPO / "examples/slurm/train_multinode.sbatch"), "examples/deepspeed_zero3_lora.yaml",
                           "train.max_steps=10"], capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    launches = (tmp_path / "launches.txt").read_text().splitlines()
    assert launches == [f"train --nnodes 2 --node-rank {r} --master-addr gpu-node-07 --master-port 29500 --nproc 4 "
                        "examples/deepspeed_zero3_lora.yaml train.resume_from_checkpoint=true train.max_steps=10"
                        for r in (0, 1)]
