"""The board's JSON API on runs made by the tiny model: listing, logs, files, compare, control, safety."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from peftkit.board.app import create_app
from peftkit.cli import main
from peftkit.config import load_config
from peftkit.train.logfile import RunLog
from peftkit.train.run import train
from tests.conftest import ALPACA_RECORDS

LOCAL = "http://127.0.0.1"  # without a token the board answers loopback Host names only


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """root/outputs/{a, b}: two finished tiny runs differing in learning rate, with an eval set."""
    root = tmp_path_factory.mktemp("board_root")
    data = root / "train.json"
    data.write_text(json.dumps(ALPACA_RECORDS), encoding="utf-8")
    for name, lr in (("a", "1e-2"), ("b", "1e-3")):
        train(load_config(None, [
            f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"train.output_dir={root / 'outputs' / name}",
            "data.cutoff_len=64", "train.max_steps=4", "train.per_device_train_batch_size=2", f"train.learning_rate={lr}",
            "train.logging_steps=1", "train.disable_tqdm=true", "train.save_strategy=no", "data.val_size=2",
            "train.eval_strategy=steps", "train.eval_steps=2"]))
    return root


@pytest.fixture()
def client(runs: Path) -> TestClient:
    return TestClient(create_app(runs / "outputs"), base_url=LOCAL)


def test_lists_runs_with_status_progress_and_losses(client: TestClient, runs: Path) -> None:
    listed = client.get("/api/runs").json()["runs"]
    assert {r["id"] for r in listed} == {"a", "b"}
    log_b = [json.loads(x) for x in (runs / "outputs/b/trainer_log.jsonl").read_text().splitlines()]
    b = next(r for r in listed if r["id"] == "b")
    assert b["status"] == "finished" and b["current_steps"] == b["total_steps"] == 4 and b["percentage"] == 100.0
    assert b["last_loss"] == [x["loss"] for x in log_b if x["event"] == "log"][-1]
    assert b["best_eval_loss"] == min(x["eval_loss"] for x in log_b if x["event"] == "eval")
    assert listed[0]["id"] == "b"  # newest first


def test_log_since_returns_only_new_lines(client: TestClient, runs: Path) -> None:
    total = len((runs / "outputs/a/trainer_log.jsonl").read_text().splitlines())
    whole = client.get("/api/runs/a/log").json()
    assert whole["next"] == total and len(whole["lines"]) == total and whole["lines"][0]["event"] == "train_begin"
    tail = client.get(f"/api/runs/a/log?since={total - 2}").json()
    assert tail["lines"] == whole["lines"][-2:] and tail["since"] == total - 2
    assert client.get(f"/api/runs/a/log?since={total + 5}").json()["since"] == 0  # a rewritten log starts over


def test_run_page_data_files_and_downloads(client: TestClient, runs: Path) -> None:
    run = client.get("/api/runs/a").json()
    assert "learning_rate: 0.01" in run["config"]
    assert run["data_report"]["examples"] > 0 and "[[" in run["data_report"]["example"]
    names = [f["name"] for f in run["files"]["model"]]
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    assert run["files"]["plot"] == "training_loss.png"
    png = client.get("/api/runs/a/files/training_loss.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    config = client.get("/api/runs/a/files/adapter_config.json").json()
    assert config["peft_type"] == "LORA"


def test_compare_lists_only_differing_keys(client: TestClient) -> None:
    diff = client.get("/api/compare?ids=a&ids=b").json()["config_diff"]
    assert diff["train.learning_rate"] == [0.01, 0.001]
    assert diff["train.output_dir"][0].endswith("a") and "model.name_or_path" not in diff


@pytest.mark.parametrize("path", [
    "/api/runs/../board_root/log", "/api/runs/..%2F..%2Fetc/log", "/api/runs/a/files/..%2F..%2Ftrain.json",
    "/api/runs/a/files/%2Fetc%2Fpasswd", "/api/runs/a%2F..%2F..%2F/log", "/api/runs/nope", "/static/..%2Fapp.py",
    "/api/compare?ids=..",
])
def test_paths_outside_runs_dir_are_404(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_start_refuses_configs_outside_root_and_output_dirs_outside_runs(client: TestClient, runs: Path) -> None:
    outside = client.post("/api/runs", json={"config": "../../etc/passwd.yaml"})
    assert outside.status_code == 404
    (runs / "elsewhere.yaml").write_text("train: {output_dir: /tmp/not_under_runs}\n")
    refused = client.post("/api/runs", json={"config": "elsewhere.yaml"})
    assert refused.status_code == 400 and "not a folder under" in refused.json()["error"]
    bad = client.post("/api/runs", json={"config": "elsewhere.yaml", "overrides": ["train.nope=1"]})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]
    assert "elsewhere.yaml" in client.get("/api/configs").json()["configs"]
    assert client.post("/api/runs/a/stop").status_code == 409  # finished: nothing to stop
    assert client.post("/api/runs/a/resume").status_code == 409  # finished: nothing to resume


def test_token_required_on_every_request(runs: Path) -> None:
    client = TestClient(create_app(runs / "outputs", token="s3cret"))
    assert client.get("/api/runs").status_code == 401
    assert client.get("/").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    page = client.get("/?token=s3cret")  # the browser's way in: the token becomes a cookie
    assert page.status_code == 200 and "peftkit board" in page.text
    assert client.get("/api/runs").status_code == 200  # the cookie now carries it


def test_cross_site_posts_and_foreign_host_names_are_refused(client: TestClient, runs: Path) -> None:
    evil = client.post("/api/runs/a/stop", headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-site" in evil.json()["error"]
    assert client.post("/api/runs/a/stop", headers={"Origin": LOCAL}).status_code == 409  # same origin: answered
    assert client.get("/api/runs", headers={"Host": "rebound.example:7860"}).status_code == 403
    assert client.get("/api/runs", headers={"Host": "localhost:7860"}).status_code == 200
    with_token = TestClient(create_app(runs / "outputs", token="t"), base_url="http://board.lan:7860")
    assert with_token.get("/api/runs", headers={"Authorization": "Bearer t"}).status_code == 200


def test_non_loopback_host_without_token_is_refused(runs: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.delenv("PEFTKIT_BOARD_TOKEN", raising=False)
    assert main(["board", str(runs / "outputs"), "--host", "0.0.0.0"]) == 2
    assert "without a token" in capsys.readouterr().err


def test_half_written_and_malformed_lines_are_skipped(tmp_path: Path) -> None:
    run = tmp_path / "outputs" / "live"
    run.mkdir(parents=True)
    log = run / "trainer_log.jsonl"
    good = {"event": "log", "current_steps": 1, "total_steps": 10, "loss": 2.0, "percentage": 10.0}
    log.write_text(json.dumps({"event": "train_begin", "current_steps": 0, "total_steps": 10}) + "\n"
                   + "{not json\n" + json.dumps(good) + "\n" + '{"event": "log", "current_st')
    client = TestClient(create_app(tmp_path / "outputs"), base_url=LOCAL)
    r = client.get("/api/runs/live/log").json()
    assert [x["event"] for x in r["lines"]] == ["train_begin", "log"]
    run_info = client.get("/api/runs/live").json()
    assert run_info["skipped_lines"] == 1 and run_info["last_loss"] == 2.0
    with open(log, "a") as f:  # the writer finishes its line
        f.write('eps": 2, "total_steps": 10, "loss": 1.5}\n')
    assert client.get("/api/runs/live/log?since=2").json()["lines"][0]["loss"] == 1.5


def test_runlog_rereads_a_rewritten_file(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    path.write_text("".join(json.dumps({"current_steps": i}) + "\n" for i in range(5)))
    log = RunLog(path)
    assert len(log.refresh()) == 5
    tmp = tmp_path / "new"
    tmp.write_text(json.dumps({"current_steps": 0}) + "\n")
    os.replace(tmp, path)  # a resume rewrites the log atomically
    assert [x["current_steps"] for x in log.refresh()] == [0]


@pytest.mark.slow
def test_start_stop_resume_through_the_api(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A run started by the board survives as its own process, stops on SIGTERM with a checkpoint, resumes."""
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))  # the child's data cache
    root = tmp_path / "project"
    (root / "outputs").mkdir(parents=True)
    (root / "train.json").write_text(json.dumps(ALPACA_RECORDS * 8))
    (root / "slow.yaml").write_text(
        f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{train: train.json, cutoff_len: 64}}\n"
        "train: {output_dir: outputs/slow, max_steps: 3000, per_device_train_batch_size: 2, logging_steps: 10, "
        "save_strategy: 'no', disable_tqdm: true}\n")
    app = create_app(root / "outputs")
    client = TestClient(app, base_url=LOCAL)
    try:
        _start_stop_resume(client)
    finally:
        app.state.launcher.kill_all()


def _start_stop_resume(client: TestClient) -> None:
    assert client.post("/api/runs", json={"config": "slow.yaml"}).json() == {"id": "slow"}
    info = _wait(client, "slow", lambda r: r["status"] == "running" and r["current_steps"] >= 10)
    assert client.post("/api/runs/slow", json={}).status_code == 405
    assert client.post("/api/runs/slow/stop").json()["signal"] == "SIGTERM"
    info = _wait(client, "slow", lambda r: r["status"] == "stopped")
    assert info["resumable"] and info["current_steps"] < 3000
    stopped_at = info["current_steps"]
    assert client.post("/api/runs/slow/resume").json() == {"id": "slow"}
    info = _wait(client, "slow", lambda r: r["status"] == "running" and r["current_steps"] > stopped_at)
    client.post("/api/runs/slow/stop")
    info = _wait(client, "slow", lambda r: r["status"] == "stopped")
    log = client.get("/api/runs/slow/log").json()["lines"]
    begins = [x for x in log if x["event"] == "train_begin"]
    assert len(begins) == 2 and begins[1]["resumed_from"].endswith(f"checkpoint-{stopped_at}")


def _wait(client: TestClient, rid: str, done, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = client.get(f"/api/runs/{rid}").json()
        if done(info):
            return info
        time.sleep(0.3)
    raise AssertionError(f"run {rid} never reached the expected state: {info}")


@pytest.mark.parametrize(("events", "alive", "status"), [
    ([], True, "starting"),
    ([], False, "failed"),
    ([("train_begin", None)], True, "running"),
    ([("train_begin", None)], None, "running"),  # written on another host: cannot tell
    ([("train_begin", None)], False, "failed"),  # killed without a last line
    ([("train_begin", None), ("train_end", "finished")], False, "finished"),
    ([("train_begin", None), ("train_end", "stopped_early")], False, "finished"),
    ([("train_begin", None), ("train_end", "finished")], True, "running"),  # evaluating after training
    ([("train_begin", None), ("train_end", "interrupted")], False, "stopped"),
    ([("train_begin", None), ("error", "error")], False, "failed"),
    ([("train_begin", None), ("train_end", "interrupted"), ("train_begin", None)], False, "failed"),
])
def test_run_status(events: list, alive: bool | None, status: str) -> None:
    from peftkit.board.runs import run_status

    assert run_status([{"event": e, "status": s} for e, s in events], alive) == status


def test_only_complete_checkpoints_make_a_run_resumable_and_foreign_pids_are_never_signalled(tmp_path: Path) -> None:
    from peftkit.constants import COMPLETE_MARKER

    run = tmp_path / "outputs" / "r"
    (run / "checkpoint-4").mkdir(parents=True)  # a write that was killed: no marker
    lines = [{"event": "train_begin", "current_steps": 0, "total_steps": 8, "pid": os.getpid(), "host": "elsewhere"},
             {"event": "train_end", "current_steps": 4, "total_steps": 8, "status": "interrupted"}]
    (run / "trainer_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    client = TestClient(create_app(tmp_path / "outputs"), base_url=LOCAL)
    info = client.get("/api/runs/r").json()
    assert info["status"] == "stopped" and not info["resumable"] and info["files"]["checkpoints"] == []
    assert client.post("/api/runs/r/resume").status_code == 409
    (run / "checkpoint-4" / COMPLETE_MARKER).write_text("")
    info = client.get("/api/runs/r").json()
    assert info["resumable"] and info["files"]["checkpoints"] == ["checkpoint-4"]

    # still running on another host: its pid (here: this test's own) must not be signalled on this one
    (run / "trainer_log.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert client.get("/api/runs/r").json()["status"] == "running"
    refused = client.post("/api/runs/r/stop")
    assert refused.status_code == 409 and "this machine" in refused.json()["error"]
