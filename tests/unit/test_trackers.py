"""`train.report_to` trackers, offline: a short run's loss, learning rate, token counts, throughput and
peftkit's config are read back from each tracker's own files."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from peftkit.config import load_config
from peftkit.errors import ConfigError
from peftkit.train.run import train
from tests.helpers import tiny_run

_KEYS = {"loss", "learning_rate", "tokens_seen", "real_tokens_seen", "supervised_tokens_seen", "tokens_per_second"}


def test_mlflow_gets_metrics_token_counts_and_the_config(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store; mlflow 3 prefers a database
    train(load_config(None, tiny_run(tiny_model_dir, tmp_path / "run", "train.report_to=mlflow", data=alpaca_file,
                                     max_steps=3)))
    client = MlflowClient(store.as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert _KEYS <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    logged = [json.loads(line) for line in (tmp_path / "run/trainer_log.jsonl").read_text().splitlines()]
    assert run.data.metrics["supervised_tokens_seen"] == logged[-1]["supervised_tokens_seen"]
    config = Path(run.info.artifact_uri.removeprefix("file://")) / "peftkit_config.yaml"
    assert f"output_dir: {tmp_path / 'run'}" in config.read_text() and "finetuning_type: lora" in config.read_text()


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header, then LevelDB's log format (32 KiB blocks of chunks,
    each a 4-byte checksum, 2-byte length and 1-byte type: full 1, first 2, middle 3, last 4)."""
    data, records, pending, offset = path.read_bytes(), [], b"", 7
    while offset + 7 <= len(data):
        block_left = 32768 - offset % 32768
        if block_left < 7:  # block trailer
            offset += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def test_wandb_offline_gets_metrics_token_counts_and_the_config(tiny_model_dir: Path, alpaca_file: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(load_config(None, tiny_run(tiny_model_dir, tmp_path / "run", "train.report_to=wandb", data=alpaca_file,
                                     max_steps=3)))
    wandb.finish()  # what the end of a `peftkit train` process does: the offline run file is complete
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = []
    for _ in range(300):  # wandb-core writes the file in the background; its last record is `exit`
        records = [wandb_internal_pb2.Record.FromString(raw) for raw in _wandb_records(path)]
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    history, config = [], {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        if record.WhichOneof("record_type") == "config":
            config.update({item.key or "/".join(item.nested_key): item.value_json for item in record.config.update})
    steps = [h for h in history if "train/loss" in h]
    assert len(steps) == 3 and {f"train/{k}" for k in _KEYS} <= set(steps[-1])
    assert steps[-1]["train/supervised_tokens_seen"] > steps[0]["train/supervised_tokens_seen"] > 0
    assert "finetuning_type" in config.get("peftkit", "") and "learning_rate" in config


def test_a_missing_tracker_names_its_extra(tmp_path: Path, alpaca_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    base = [f"data.train={alpaca_file}", f"train.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"train.report_to: wandb is not installed \(pip install 'peftkit\[wandb\]'\)"):
        load_config(None, [*base, "train.report_to=[mlflow, wandb]"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "swanlab" else real(name, *a))
    with pytest.raises(ConfigError, match=r"swanlab is not installed \(pip install 'peftkit\[swanlab\]'\)"):
        load_config(None, [*base, "train.report_to=swanlab"])  # before any model loads


def test_swanlab_offline_gets_metrics_token_counts_and_the_config(tiny_model_dir: Path, alpaca_file: Path,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SwanLab's offline mode writes a run file of protobuf records (read with swanlab's own reader, the one
    `swanlab sync` uses) and files/config.yaml. transformers' own SwanLabCallback would stop the run at its
    first step with these versions; peftkit uses SwanLab's callback instead."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    import swanlab

    train(load_config(None, tiny_run(tiny_model_dir, tmp_path / "run", "train.report_to=swanlab", data=alpaca_file,
                                     max_steps=3)))
    swanlab.finish()  # what the end of a `peftkit train` process does (atexit): the run file is written then
    (run_file,) = (tmp_path / "swanlog").glob("run-*/run-*.swanlab")
    reader = DataStoreReader()
    reader.open(run_file)
    scalars: dict[str, list[tuple[int, float]]] = {}
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        if record.HasField("scalar"):
            scalars.setdefault(record.scalar.key, []).append((record.scalar.step, record.scalar.value.number))
    assert {f"train/{k}" for k in _KEYS} <= set(scalars)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
    logged = [json.loads(line) for line in (tmp_path / "run/trainer_log.jsonl").read_text().splitlines()]
    assert scalars["train/supervised_tokens_seen"][-1][1] == logged[-1]["supervised_tokens_seen"]
    config = next((tmp_path / "swanlog").glob("run-*/files/config.yaml")).read_text()
    assert "peftkit:" in config and "finetuning_type: lora" in config and "learning_rate" in config
