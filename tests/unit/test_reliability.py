"""Nothing a user did not ask to replace is lost, and bad input gets a message (exit 2), never a traceback.

One test per finding of the reliability review (export, train, lock, resume hints, eval outputs, data files,
cache, disk full, config numbers, serve), plus property-based fuzzing of the data readers and the request parser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftkit.cli import main
from peftkit.config import load_config
from peftkit.errors import DataError, PeftkitError
from peftkit.train.run import train
from tests.helpers import tiny_run


def _overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_run(model, out, "finetuning.lora_rank=4", *extra, data=data, logging_steps=None)


@pytest.fixture()
def run_dir(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "runs" / "run"
    train(load_config(None, _overrides(tiny_model_dir, alpaca_file, out)))
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. export never deletes what it did not write


def test_export_refuses_a_folder_holding_other_files(run_dir: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("notes")
    assert main(["export", "--adapter", str(run_dir), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"--out {mine}: the folder holds files that are not a peftkit export" in err and "--overwrite" in err
    assert (mine / "notes.txt").read_text() == "notes" and (mine / "sub").is_dir()
    assert main(["export", "--adapter", str(run_dir), "--out", str(mine), "--overwrite"]) == 0
    assert not (mine / "notes.txt").exists() and (mine / "export_report.json").is_file()


@pytest.mark.parametrize("where", ["run", "inside", "parent", "cwd"])
def test_export_never_into_or_above_the_run(where: str, run_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    (run_dir.parent / "sibling").mkdir()
    (run_dir.parent / "sibling" / "adapter_model.safetensors").write_text("another run")
    monkeypatch.chdir(tmp_path)
    out = {"run": run_dir, "inside": run_dir / "merged", "parent": run_dir.parent, "cwd": Path(".")}[where]
    before = _tree(tmp_path / "runs")
    for flags in ([], ["--overwrite"]):  # not even with the flag
        assert main(["export", "--adapter", str(run_dir), "--out", str(out), *flags]) == 2
        assert "--out" in capsys.readouterr().err
    assert _tree(tmp_path / "runs") == before


def test_export_replaces_its_own_previous_export_and_is_readable_by_others(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(run_dir), "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from the previous export")
    assert main(["export", "--adapter", str(run_dir), "--out", str(out)]) == 0
    assert not (out / "stale.txt").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


# 2. a fresh train never replaces a finished run


def test_fresh_train_into_a_finished_run_is_refused(run_dir: Path, tiny_model_dir: Path, alpaca_file: Path) -> None:
    before = _tree(run_dir)
    with pytest.raises(PeftkitError, match=r"already holds a finished run \(adapter_model.safetensors.*overwrite_output_dir"):
        train(load_config(None, _overrides(tiny_model_dir, alpaca_file, run_dir)))
    with pytest.raises(PeftkitError, match="holds a finished run"):  # resume=true has no checkpoint to go on from
        train(load_config(None, _overrides(tiny_model_dir, alpaca_file, run_dir, "train.resume_from_checkpoint=true")))
    assert _tree(run_dir) == before
    train(load_config(None, _overrides(tiny_model_dir, alpaca_file, run_dir, "train.overwrite_output_dir=true")))
    rows = [json.loads(x) for x in (run_dir / "trainer_log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "train_begin" for r in rows) == 1  # the old run's log went with it


# 3. one writer per output_dir


def test_second_train_on_the_same_output_dir_exits_2_naming_the_holder(tiny_model_dir, alpaca_file, tmp_path,
                                                                        capsys) -> None:
    import socket

    from peftkit.train.runlock import RunLock

    out = tmp_path / "run"
    with RunLock(out):
        assert main(["train", str(_empty_config(tmp_path)), *_overrides(tiny_model_dir, alpaca_file, out)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another peftkit train (pid {os.getpid()} on host {socket.gethostname()})" in err
    assert not (out / "config.yaml").exists()  # the second process wrote nothing


def test_the_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    from peftkit.train.runlock import RunLock

    code = "import sys, time; from peftkit.train.runlock import RunLock; RunLock(sys.argv[1]).__enter__(); " \
           "print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(PeftkitError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with RunLock(tmp_path):  # no stale lock
        pass


# 4. exact resume hints; a resume with another config is refused


def test_resume_hint_keeps_every_override_quoted() -> None:
    from peftkit.cli.parser import build_parser
    from peftkit.cli.train import resume_command

    args = build_parser().parse_args(["train", "my conf.yaml", "train.output_dir=runs/a b", "train.max_steps=3",
                                      "train.resume_from_checkpoint=false"])
    assert resume_command(args) == ("peftkit train 'my conf.yaml' 'train.output_dir=runs/a b' train.max_steps=3 "
                                    "train.resume_from_checkpoint=true")
    nodes = build_parser().parse_args(["train", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                                       "--nproc", "4", "c.yaml"])
    assert resume_command(nodes) == ("peftkit train --nproc=4 --nnodes=2 --node-rank=1 --master-addr=10.0.0.1 "
                                     "--master-port=29500 c.yaml train.resume_from_checkpoint=true")


def test_several_nodes_need_the_address_of_node_0(capsys) -> None:
    from peftkit.cli import main

    assert main(["train", "--nnodes", "2", "c.yaml"]) == 2
    assert "--nnodes 2 needs --master-addr" in capsys.readouterr().err


def test_resuming_with_a_different_config_is_refused(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = ["train.save_strategy=steps", "train.save_steps=2", "train.max_steps=4"]
    first = load_config(None, _overrides(tiny_model_dir, alpaca_file, out, *flags))
    from peftkit.train import run as run_module

    class Stop(Exception):
        pass

    real = run_module.PeftTrainer.train

    def stop_after_the_checkpoint(self, *a, **k):  # a run that ends (as if preempted) after checkpoint-2
        self.args.max_steps = 2
        real(self, *a, **k)
        raise Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module.PeftTrainer, "train", stop_after_the_checkpoint)
        with pytest.raises(Stop):
            train(first)
    changed = load_config(None, _overrides(tiny_model_dir, alpaca_file, out, *flags, "train.learning_rate=5e-3",
                                           "train.resume_from_checkpoint=true"))
    with pytest.raises(PeftkitError, match=r"differs from the one it was trained with .*\n  train.learning_rate: 0.01 -> 0.005"):
        train(changed)
    same = load_config(None, _overrides(tiny_model_dir, alpaca_file, out, *flags, "train.resume_from_checkpoint=true"))
    assert train(same).summary["train_loss"] > 0


# 5. eval writes into its own folder


def test_eval_of_a_run_keeps_the_runs_own_results(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny_model_dir, alpaca_file, out, f"eval.dataset={alpaca_file}",
                                       "eval.metrics=[exact_match]", "generate.max_new_tokens=2")))
    before = _tree(out)
    assert main(["eval", str(out / "config.yaml"), "--adapter", str(out), "eval.max_samples=3"]) == 0
    assert {k: v for k, v in _tree(out).items() if not k.startswith("eval/")} == before
    results = json.loads((out / "eval" / "train" / "predict_results.json").read_text())
    assert results["dataset"] == str(alpaca_file) and results["records"] == 3
    assert main(["eval", str(out / "config.yaml"), "--adapter", str(out), "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "generated_predictions.jsonl").is_file()


# 6. unreadable data files


def _empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("finetuning: {finetuning_type: lora}\n")
    return path


_LATIN1 = "Café crème, señor".encode("latin-1")


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("random.json", bytes(range(256)) * 4, "is not UTF-8 text"),
    ("latin.json", b'[{"instruction": "' + _LATIN1 + b'", "output": "x"}]', "is not UTF-8 text"),
    ("latin.jsonl", b'{"instruction": "' + _LATIN1 + b'", "output": "x"}\n', "is not UTF-8 text (byte 20 of the line"),
    ("latin.txt", _LATIN1 + b"\n", "is not UTF-8 text (byte 3 of the line"),
    ("garbage.parquet", b"PAR1 this is not parquet" * 10, "cannot be read as Parquet"),
])
@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
def test_unreadable_data_files_are_named_not_tracebacks(name: str, content: bytes, expected: str, on_bad_record: str,
                                                        tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    fmt = "text" if name.endswith(".txt") else "alpaca"
    code = main(["data", str(_empty_config(tmp_path)), f"model.name_or_path={tokenizer_dir}", f"data.train={path}",
                 f"data.format={fmt}", f"data.on_bad_record={on_bad_record}", "train.output_dir=x", "stage=" +
                 ("pt" if fmt == "text" else "sft")])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and expected in err and "Traceback" not in err


# 7. a damaged cache is rebuilt, never loaded


@pytest.mark.parametrize("damage", ["truncate_arrow", "overwrite_arrow", "bad_state", "no_report"])
def test_damaged_cache_is_rebuilt_with_a_warning(damage: str, tokenizer, alpaca_file: Path, tmp_path: Path,
                                                 caplog) -> None:
    from peftkit.config.schema import DataArgs
    from peftkit.data import apply_template, prepare_data
    from peftkit.data import cache as cache_module

    apply_template(tokenizer, "chatml")
    args = DataArgs(train=[str(alpaca_file)], cutoff_len=64)
    fresh = prepare_data(args, tokenizer)
    folder = next((tmp_path / "peftkit_home" / "data_cache").iterdir())
    arrow = next(folder.rglob("*.arrow"))
    if damage == "truncate_arrow":
        arrow.write_bytes(arrow.read_bytes()[:100])
    elif damage == "overwrite_arrow":  # same size, other bytes: loads fine without a checksum
        data = bytearray(arrow.read_bytes())
        data[-500:-100] = bytes(400)
        arrow.write_bytes(bytes(data))
    elif damage == "bad_state":
        next(folder.rglob("state.json")).write_text("{bad")
    else:
        (folder / "data_report.json").unlink()
    assert cache_module.load_cache(folder.name) is None
    assert "is damaged" in caplog.text
    again = prepare_data(args, tokenizer)
    assert again.train["labels"] == fresh.train["labels"] and again.train["input_ids"] == fresh.train["input_ids"]
    assert cache_module.load_cache(folder.name) is not None  # rebuilt whole


# 8. disk full while saving a checkpoint


def test_disk_full_during_a_checkpoint_names_space_and_what_was_kept(tiny_model_dir, alpaca_file, tmp_path,
                                                                     monkeypatch, capsys) -> None:
    from peftkit.train.trainer import PeftTrainer

    out = tmp_path / "run"
    real = PeftTrainer._save_optimizer_and_scheduler

    def full_disk(self, output_dir):
        if self.state.global_step == 4:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 5888 vs 5776")
        return real(self, output_dir)

    monkeypatch.setattr(PeftTrainer, "_save_optimizer_and_scheduler", full_disk)
    code = main(["train", str(_empty_config(tmp_path)), *_overrides(
        tiny_model_dir, alpaca_file, out, "train.max_steps=6", "train.save_strategy=steps", "train.save_steps=2")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"writing under {out} failed" in err and "most likely the disk is full" in err and "GiB free" in err
    assert f"Kept: {out / 'checkpoint-2'}" in err
    assert not (out / "checkpoint-4" / ".peftkit_complete").exists()  # never taken as complete


def test_storage_errors_are_recognised() -> None:
    import errno

    from peftkit.atomic import storage_error

    assert "No space left" in str(storage_error(OSError(errno.ENOSPC, "No space left on device"), Path("/x/y"), "Kept: z"))
    assert storage_error(OSError(errno.ENOENT, "missing"), Path("/x"), "") is None
    assert storage_error(RuntimeError("shape mismatch"), Path("/x"), "") is None


# 9. numbers that cannot train are config errors, before any model loads


@pytest.mark.parametrize(("override", "message"), [
    ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size=0: must be at least 1"),
    ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps=0: must be at least 1"),
    ("train.learning_rate=.nan", "train.learning_rate=nan: must be a finite number"),
    ("train.num_train_epochs=-1", "train.num_train_epochs=-1.0: must be above 0"),
])
def test_numbers_that_cannot_train_are_config_errors(override: str, message: str, alpaca_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", str(_empty_config(tmp_path)), f"data.train={alpaca_file}", f"train.output_dir={out}",
                 override]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_config_path_messages(tmp_path: Path, capsys) -> None:
    assert main(["data", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["data", str(empty)]) == 2
    assert f"{empty} is empty" in capsys.readouterr().err


# smaller findings


def test_orphaned_temporary_folders_of_killed_writers_are_removed(tmp_path: Path) -> None:
    from peftkit.atomic import _host, write_dir_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".model.tmp-{dead.stdout.strip()}-{_host()}-abcd1234"
    orphan.mkdir()
    (orphan / "shard.safetensors").write_bytes(b"0" * 1000)
    mine = tmp_path / f".model.tmp-{os.getpid()}-{_host()}-live"  # a live process's write is left alone
    mine.mkdir()
    # another node's write in progress on a shared file system: its pid means nothing here
    elsewhere = tmp_path / f".model.tmp-{dead.stdout.strip()}-0therh0s-abcd1234"
    elsewhere.mkdir()
    write_dir_atomic(tmp_path / "model", lambda p: (p / "a.txt").write_text("a"))
    assert not orphan.exists() and mine.exists() and elsewhere.exists() and (tmp_path / "model" / "a.txt").is_file()


def test_empty_answers_are_kept_and_reported(tmp_path: Path, caplog) -> None:
    from peftkit.config.schema import DataArgs, DatasetSpec
    from peftkit.data.dataset import iter_samples

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": ""}, {"instruction": "b", "output": "x"}]))
    samples = list(iter_samples(DatasetSpec(path=str(path), format="alpaca"), DataArgs()))
    assert len(samples) == 2
    assert f"1 record(s) with an empty answer (first: {path}: record 0)" in caplog.text


def test_type_names_read_as_english(tmp_path: Path) -> None:
    from peftkit.config.schema import DataArgs, DatasetSpec
    from peftkit.data.dataset import iter_samples

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": 3}]))
    with pytest.raises(DataError, match="must be a string, got a number"):
        list(iter_samples(DatasetSpec(path=str(path), format="alpaca"), DataArgs()))


def test_system_message_for_records_without_one(tmp_path: Path) -> None:
    from peftkit.config.schema import DataArgs, DatasetSpec
    from peftkit.data.dataset import iter_samples

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d", "system": "S"}]))
    spec = DatasetSpec(path=str(path), format="alpaca")
    got = [s["messages"][0] for s, _ in iter_samples(spec, DataArgs(system=""))]
    assert got == [{"role": "system", "content": ""}, {"role": "system", "content": "S"}]
    assert [s["messages"][0]["role"] for s, _ in iter_samples(spec, DataArgs())] == ["user", "system"]


# 10-11. serve: validation, body size, disconnects


@pytest.fixture(scope="module")
def app_and_calls(tiny_model_dir: Path):
    """The app over the tiny model, each forward slowed to 20 ms and counted (a generation long enough to watch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.serve.app import create_app
    from peftkit.serve.service import Service

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    from peftkit.data.template import stop_token_ids

    calls = {"n": 0}
    real_forward = model.forward
    never = stop_token_ids(tokenizer) + [tokenizer.pad_token_id]

    def slow_forward(*a, **k):
        calls["n"] += 1
        time.sleep(0.02)
        out = real_forward(*a, **k)
        out.logits[..., never] = float("-inf")  # never stops early: only max_tokens or a cancel ends it
        return out

    model.forward = slow_forward
    app = create_app(Service(model, tokenizer, 512), "tiny", max_tokens_limit=400, max_body_bytes=100_000)
    return app, calls


@pytest.fixture(scope="module")
def live_server(app_and_calls):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app_and_calls[0], host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app_and_calls[1]
    server.should_exit = True
    thread.join(timeout=10)


_GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("extra", "code"), [
    ({"stream": True, "stream_options": "yes"}, "invalid_stream_options"),
    ({"max_tokens": 0}, "invalid_max_tokens"),
    ({"temperature": True}, "invalid_temperature"),
    ({"stream": "false"}, "invalid_stream"),
    ({"messages": [{"role": "user", "content": 5}]}, "invalid_messages"),
])
def test_requests_are_validated_by_type(extra: dict, code: str, live_server) -> None:
    import httpx

    r = httpx.post(f"{live_server[0]}/v1/chat/completions", json={**_GOOD, **extra}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == code


def test_text_parts_content_is_accepted_and_a_large_body_is_413(live_server) -> None:
    import httpx

    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2}
    assert httpx.post(f"{live_server[0]}/v1/chat/completions", json={**_GOOD, **parts}, timeout=60).status_code == 200
    big = {**_GOOD, "messages": [{"role": "user", "content": "x" * 200_000}]}
    r = httpx.post(f"{live_server[0]}/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(stream: bool, live_server) -> None:
    import httpx

    base, calls = live_server
    body = {**_GOOD, "max_tokens": 400, "stream": stream}
    start = calls["n"]
    with httpx.Client(timeout=30) as client:
        if stream:
            with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                next(r.iter_lines())  # the first event: generation is under way
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(f"{base}/v1/chat/completions", json=body, timeout=1.0)
    time.sleep(1.5)
    settled = calls["n"]
    time.sleep(1.0)
    assert calls["n"] == settled  # nothing runs any more
    assert settled - start < 200  # far short of the 400 tokens asked for (20 ms each)
    ok = httpx.post(f"{base}/v1/chat/completions", json={**_GOOD, "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200  # the lock was released


# property-based fuzzing: no input is a traceback or a 500


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".json", ".jsonl", ".txt"]),
       fmt=st.sampled_from(["alpaca", "sharegpt", "preference", "text", "pairs"]))
def test_fuzz_data_readers_raise_only_data_errors(content: bytes, suffix: str, fmt: str, tmp_path_factory) -> None:
    from peftkit.config.schema import DataArgs, DatasetSpec
    from peftkit.data.dataset import iter_samples

    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(content)
    try:
        list(iter_samples(DatasetSpec(path=str(path), format=fmt), DataArgs()))
    except DataError:
        pass


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                            max_leaves=12)
_bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["tiny", "other"]) | _json_values,
    "messages": st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "x"]) | _json_values,
                                                             "content": st.text(max_size=10) | _json_values}), max_size=3)
    | _json_values,
    "max_tokens": st.integers(-5, 600) | _json_values, "temperature": _json_values, "top_p": _json_values,
    "stream": _json_values, "stream_options": _json_values, "stop": _json_values, "n": _json_values,
}) | _json_values


@settings(max_examples=300, deadline=None)
@given(body=_bodies)
def test_fuzz_request_parser_answers_only_api_errors(body) -> None:
    from peftkit.serve.requests import ApiError, _parse

    try:
        request, stream, usage = _parse(body, {"tiny": None}, 64)  # as create_app passes the served names
    except ApiError as e:
        assert 400 <= e.status < 500
        return
    assert 1 <= request.max_tokens <= 64 and isinstance(stream, bool) and isinstance(usage, bool)
    assert all(isinstance(m["content"], str) for m in request.messages)
