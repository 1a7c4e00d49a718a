"""Two processes (torchrun, gloo on CPU) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train={REPO / 'data/demo/alpaca_en_demo.json'}",
              "data.max_samples=48", "data.cutoff_len=128", "train.max_steps=5", "train.logging_steps=1",
              "train.learning_rate=1e-2", "train.seed=0", "train.disable_tqdm=true", "train.save_strategy=steps",
              "train.save_steps=5"]
    single = tmp_path / "single"
    train(load_config(None, [*common, f"train.output_dir={single}", "train.per_device_train_batch_size=4"]))

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


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`peftkit train --nnodes 2 --node-rank R --master-addr 127.0.0.1` twice (one process each, gloo): the
    losses of one process with the same global batch; only global rank 0 writes the run folder."""
    import socket

    common = [f"model.name_or_path={tiny_model_dir}", f"data.train={REPO / 'data/demo/alpaca_en_demo.json'}",
              "data.max_samples=48", "data.cutoff_len=128", "train.max_steps=4", "train.logging_steps=1",
              "train.learning_rate=1e-2", "train.seed=0", "train.disable_tqdm=true"]
    single = tmp_path / "single"
    train(load_config(None, [*common, f"train.output_dir={single}", "train.per_device_train_batch_size=4"]))

    config = tmp_path / "config.yaml"
    config.write_text("finetuning: {finetuning_type: lora}\n")
    nodes = tmp_path / "nodes"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PEFTKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}  # one shared cache
    procs = [subprocess.Popen(
        [sys.executable, "-m", "peftkit", "train", "--nnodes", "2", "--node-rank", str(rank), "--master-addr",
         "127.0.0.1", "--master-port", str(port), str(config), *common, f"train.output_dir={nodes}",
         "train.per_device_train_batch_size=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert outputs[0][0].count("training loss:") == 1 and "training loss:" not in outputs[1][0]  # rank 0 reports
    assert _losses(nodes) == pytest.approx(_losses(single), abs=1e-4)
    rows = [json.loads(line) for line in (nodes / "trainer_log.jsonl").read_text().splitlines()]
    assert rows[0]["world_size"] == 2 and sum(r["event"] == "train_begin" for r in rows) == 1
