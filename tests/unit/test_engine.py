"""The batching engine (infer/engine.py) on the tiny model: batched answers equal one-at-a-time answers,
rows join and leave at token granularity, per-request sampling, cancellation, the bounded queue, several
adapters in one batch, and the server's use of it (n, seed, logprobs, 429, /metrics, adapter routing)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from peftkit.data.render import render_prompt
from peftkit.data.template import stop_token_ids
from peftkit.errors import PeftkitError
from peftkit.infer.chat import load_for_chat
from peftkit.infer.engine import Engine
from peftkit.infer.jobs import QueueFull, Sampling

TEXTS = ["hi", "a much longer question here, with more words in it than the others", "two", "three words here",
         "x", "高勇：男，中国国籍", "Name a colour.", "Count to three, then stop."]


@pytest.fixture()
def model_and_tok(tiny_model_dir: Path):
    model, tok = load_for_chat(str(tiny_model_dir), None)
    with torch.no_grad():  # end-of-turn made unlikely: answers run to their budgets (rows leave at different steps)
        for t in stop_token_ids(tok):
            model.lm_head.weight[t] = 0.0
    return model, tok


def _prompts(tok) -> list[list[int]]:
    return [render_prompt(tok, [{"role": "user", "content": t}]) for t in TEXTS]


def _alone(model, tok, prompt: list[int], sampling: Sampling) -> list[int]:
    engine = Engine(model, tok, slots=1, max_len=len(prompt) + sampling.max_new_tokens)
    return engine.generate([prompt], sampling)[0].tokens


def test_continuous_batching_equals_one_at_a_time(model_and_tok) -> None:
    model, tok = model_and_tok
    prompts = _prompts(tok)
    budgets = [3, 17, 9, 1, 12, 6, 20, 4]  # rows finish at different steps; waiting ones take their place
    samplings = [Sampling(max_new_tokens=b) for b in budgets]
    # 3 rows for 8 requests, and a cache barely longer than the longest request: shifts and compactions happen
    engine = Engine(model, tok, slots=3, max_len=max(len(p) + b for p, b in zip(prompts, budgets)) + 2)
    shifts = []
    real_shift = engine.slot_cache.shift
    engine.slot_cache.shift = lambda n, d: (shifts.append(d), real_shift(n, d))[1]
    finished: list[int] = []
    jobs = engine.generate(prompts, samplings, on_done=lambda i, job: finished.append(i))
    assert [len(j.tokens) for j in jobs] == budgets and all(j.finish_reason == "length" for j in jobs)
    for prompt, sampling, job in zip(prompts, samplings, jobs):
        assert job.tokens == _alone(model, tok, prompt, sampling)
    assert sorted(finished) == list(range(8)) and finished != sorted(finished, key=lambda i: -len(prompts[i]))
    assert any(d < 0 for d in shifts) and any(d > 0 for d in shifts)  # both directions were exercised
    assert not engine.active and engine.slot_cache.t == 0


def test_stop_token_ends_a_row_and_is_reported(tiny_model_dir: Path) -> None:
    model, tok = load_for_chat(str(tiny_model_dir), None)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # <|im_end|> the certain next token
        model.lm_head.weight.zero_()
        model.lm_head.weight[end] = 1.0
        model.model.norm.weight.fill_(1.0)
    (job,) = Engine(model, tok, slots=2, max_len=64).generate(_prompts(tok)[:1], Sampling(max_new_tokens=9))
    assert job.tokens == [] and job.finish_reason == "stop" and job.stop_token in stop_token_ids(tok)


def test_sampling_is_per_request_and_seeded(model_and_tok) -> None:
    model, tok = model_and_tok
    prompts = _prompts(tok)
    hot = Sampling(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    engine = Engine(model, tok, slots=8, max_len=128)
    # the seeded request beside greedy and other seeded ones: its answer depends on its seed only
    jobs = engine.generate(prompts[:4], [hot, Sampling(max_new_tokens=8), Sampling(max_new_tokens=8, temperature=1.5,
                                                                                  seed=8), hot])
    assert jobs[0].tokens == _alone(model, tok, prompts[0], hot)
    assert jobs[1].tokens == _alone(model, tok, prompts[1], Sampling(max_new_tokens=8))
    again = engine.generate([prompts[2]], Sampling(max_new_tokens=8, temperature=1.5, seed=9))[0].tokens
    assert again != jobs[2].tokens  # another seed, another sample (8 tokens from a 1.5-temperature random model)


def test_repetition_penalty_matches_transformers(model_and_tok) -> None:
    model, tok = model_and_tok
    prompt = _prompts(tok)[1]
    ours = _alone(model, tok, prompt, Sampling(max_new_tokens=10, repetition_penalty=1.3))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, repetition_penalty=1.3,
                             eos_token_id=None, temperature=None, top_p=None, top_k=None)
    assert ours == out[0, len(prompt):].tolist()


def test_cancel_frees_the_row_and_a_cancelled_waiting_job_never_runs(model_and_tok) -> None:
    model, tok = model_and_tok
    prompts = _prompts(tok)
    engine = Engine(model, tok, slots=1, max_len=128)
    running = engine.submit(prompts[0], Sampling(max_new_tokens=50))
    waiting = engine.submit(prompts[1], Sampling(max_new_tokens=5))
    engine.step()
    engine.step()
    running.cancel()
    waiting.cancel()
    engine.step()
    assert running.finish_reason == "cancelled" and 0 < len(running.tokens) < 50
    assert waiting.finish_reason == "cancelled" and waiting.tokens == []
    assert not engine.active and not engine.waiting


def test_a_full_queue_refuses_and_a_request_that_cannot_fit_is_an_error(model_and_tok) -> None:
    model, tok = model_and_tok
    engine = Engine(model, tok, slots=1, max_len=64, max_queue=2)
    for _ in range(2):
        engine.submit([1, 2, 3], Sampling(max_new_tokens=4))
    with pytest.raises(QueueFull):
        engine.submit([1, 2, 3], Sampling(max_new_tokens=4))
    with pytest.raises(ValueError, match="holds 64"):
        Engine(model, tok, slots=1, max_len=64).submit(list(range(60)), Sampling(max_new_tokens=8))


def _adapter(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir: Path, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(_adapter(tiny_model_dir, root / name, seed)) for name, seed in (("ner", 1), ("chat", 2))}


def test_two_adapters_in_one_batch_answer_as_each_alone(tiny_model_dir: Path, two_adapters: dict[str, str]) -> None:
    from peftkit.config.schema import ModelArgs
    from peftkit.serve import load_served

    model, tok, served = load_served((ModelArgs(name_or_path=str(tiny_model_dir)), [f"{n}={p}" for n, p in
                                                                                    two_adapters.items()], "sft", None))
    assert served == {"ner": "default", "chat": "chat"}
    prompts = _prompts(tok)
    names = ["ner", "chat", "chat", "ner", "ner", "chat", "ner", "chat"]
    engine = Engine(model, tok, slots=4, max_len=128, adapters=list(served.values()))
    mixed = engine.generate(prompts, [Sampling(max_new_tokens=10, adapter=served[n]) for n in names])
    for name in ("ner", "chat"):
        single, stok, _ = load_served((ModelArgs(name_or_path=str(tiny_model_dir)), [two_adapters[name]], "sft", None))
        want = Engine(single, stok, slots=4, max_len=128).generate(prompts, Sampling(max_new_tokens=10))
        for job, w, n in zip(mixed, want, names):
            if n == name:
                assert job.tokens == w.tokens
    assert mixed[0].tokens != mixed[1].tokens or mixed[3].tokens != mixed[2].tokens  # the adapters differ


# ---- the server on the engine -------------------------------------------------------------------------


@pytest.fixture()
def slow_app(tiny_model_dir: Path):
    """The app over the tiny model with 1 row, a queue of 2 and each forward slowed to 30 ms."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.serve.app import create_app
    from peftkit.serve.service import Service

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    real = model.forward

    def slow(*a, **k):
        time.sleep(0.03)
        return real(*a, **k)

    model.forward = slow
    service = Service(model, tok, 512, slots=1, max_queue=2)
    yield create_app(service, "tiny"), service
    service.close()


def test_requests_beyond_the_queue_get_429_and_every_admitted_one_is_answered(slow_app) -> None:
    from fastapi.testclient import TestClient

    app, service = slow_app
    client = TestClient(app)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
    codes: list[int] = []

    def one() -> None:
        codes.append(client.post("/v1/chat/completions", json=body).status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert sorted(set(codes)) == [200, 429] and codes.count(200) >= 3  # 1 running + 2 waiting at least
    metrics = client.get("/metrics").text
    assert "peftkit_queue_depth 0" in metrics and "peftkit_generated_tokens_total" in metrics
    assert client.get("/health").json() == {"status": "ok"}


def test_n_seed_and_logprobs(slow_app) -> None:
    from fastapi.testclient import TestClient

    app, _ = slow_app
    client = TestClient(app)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 1.0,
            "seed": 3, "n": 2, "logprobs": True, "top_logprobs": 2}
    first = client.post("/v1/chat/completions", json=body).json()
    again = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in first["choices"]] == [c["message"]["content"] for c in again["choices"]]
    assert len({c["message"]["content"] for c in first["choices"]}) > 1  # n samples, not one repeated
    entries = first["choices"][0]["logprobs"]["content"]
    assert len(entries) == 6 and all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in entries)
    assert all(e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6 for e in entries)
    assert first["usage"]["completion_tokens"] == 12


def _events(client, url: str, body: dict) -> list[dict]:
    with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_logprobs_stream_chunk_by_chunk_and_equal_the_whole_answers(slow_app) -> None:
    """Streamed logprobs (chat and completions) add up to the non-streamed ones, token for token (greedy)."""
    from fastapi.testclient import TestClient

    app, _ = slow_app
    client = TestClient(app)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    whole = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
    chunks = _events(client, "/v1/chat/completions", {**chat, "stream": True})
    streamed = [e for c in chunks for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert len(whole) == 7 and [e["token"] for e in streamed] == [e["token"] for e in whole]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in whole], abs=1e-5)
    assert all(len(e["top_logprobs"]) == 2 for e in streamed)

    plain = {"model": "tiny", "prompt": "hello there", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    done = client.post("/v1/completions", json=plain).json()["choices"][0]
    lp = done["logprobs"]
    assert "".join(lp["tokens"]) == done["text"] and len(lp["tokens"]) == 6
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(6)]  # from the completion's start
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(1 <= len(t) <= 3 for t in lp["top_logprobs"])
    assert all(max(t.values()) >= v - 1e-6 for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    pieces = [c["choices"][0] for c in _events(client, "/v1/completions", {**plain, "stream": True})]
    joined = {k: [x for p in pieces if p["logprobs"] for x in p["logprobs"][k]] for k in lp}
    assert joined["tokens"] == lp["tokens"] and joined["text_offset"] == lp["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert "".join(p["text"] for p in pieces) == done["text"]


def test_the_request_model_picks_the_adapter(tiny_model_dir: Path, two_adapters: dict[str, str]) -> None:
    from fastapi.testclient import TestClient

    from peftkit.config.schema import ModelArgs
    from peftkit.serve import load_served
    from peftkit.serve.app import create_app
    from peftkit.serve.service import Service

    def app_for(adapters: list[str]):
        model, tok, served = load_served((ModelArgs(name_or_path=str(tiny_model_dir)), adapters, "sft", None))
        service = Service(model, tok, 512, slots=4, adapters=[a for a in served.values() if a] or None)
        return TestClient(create_app(service, served)), service

    both, service = app_for([f"{n}={p}" for n, p in two_adapters.items()])
    assert [m["id"] for m in both.get("/v1/models").json()["data"]] == ["ner", "chat"]
    messages = [{"role": "user", "content": "Name a colour."}]
    for name, path in two_adapters.items():
        alone, alone_service = app_for([f"{name}={path}"])
        body = {"model": name, "messages": messages, "max_tokens": 8, "temperature": 0}
        want = alone.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert both.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == want
        alone_service.close()
    missing = both.post("/v1/chat/completions", json={"model": "other", "messages": messages})
    assert missing.status_code == 404 and "'ner', 'chat'" in json.dumps(missing.json())
    service.close()


def test_eval_resumes_an_interrupted_run(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, monkeypatch) -> None:
    """A kill after some answers (simulated: the engine raises after 3) leaves them in the partial file; the
    next eval generates only the others, and its predictions equal an uninterrupted eval's."""
    from peftkit.config import load_config
    from peftkit.eval import predict as predict_module

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"eval.dataset={alpaca_file}",
                             "train.output_dir=x", "eval.metrics=[exact_match]", "eval.batch_size=2",
                             "generate.max_new_tokens=6"])
    model, tok = load_for_chat(str(tiny_model_dir), None)
    clean = predict_module.predict(model, tok, cfg, tmp_path / "clean")
    real = predict_module.generate_batch
    asked: list[int] = []

    def killed(model, tok, prompts, args, dtype=None, slots=64, on_done=None, pixels=None):
        asked.append(len(prompts))
        count = [0]

        def done(i, job):
            on_done(i, job)
            count[0] += 1
            if len(asked) == 1 and count[0] == 3:
                raise KeyboardInterrupt

        return real(model, tok, prompts, args, dtype, slots, done)

    partial = tmp_path / "run" / ".generated_predictions.jsonl.partial"
    monkeypatch.setattr(predict_module, "generate_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict(model, tok, cfg, tmp_path / "run")
    assert partial.exists() and not (tmp_path / "run" / "generated_predictions.jsonl").exists()
    with open(partial, "a") as f:
        f.write('{"index": 7, "tok')  # the line a SIGKILL cut short
    resumed = predict_module.predict(model, tok, cfg, tmp_path / "run")
    assert asked == [8, 5]  # 3 answers kept, 5 generated again
    assert not partial.exists()
    assert (tmp_path / "run" / "generated_predictions.jsonl").read_text() == \
        (tmp_path / "clean" / "generated_predictions.jsonl").read_text()
    assert resumed["exact_match"] == clean["exact_match"]


def test_vllm_hand_off_names_what_vllm_needs(two_adapters: dict[str, str], tmp_path: Path, capsys) -> None:
    from peftkit.cli import main
    from peftkit.serve.vllm import vllm_hand_off

    run = Path(two_adapters["ner"])
    command, blocks = vllm_hand_off(run)
    assert command.startswith("vllm serve ") and f"--enable-lora --lora-modules ner={run}" in command
    assert "--max-lora-rank" not in command and blocks == []  # rank 4 is within vLLM's default 16
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((run / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 64, "use_dora": True, "bias": "all",
                                                         "modules_to_save": ["lm_head"]}))
    command, blocks = vllm_hand_off(bad, "x")
    assert "--max-lora-rank 64" in command and "--enable-lora-bias" in command
    assert any("DoRA" in b for b in blocks) and any("modules_to_save" in b for b in blocks)
    assert main(["serve", "--adapter", f"chat={two_adapters['chat']}", "--print-vllm"]) == 0
    assert f"--lora-modules chat={two_adapters['chat']}" in capsys.readouterr().out
    # A run trained with peftkit's chatml: vLLM gets that template and the parsers for its calls and reasoning.
    from importlib import resources

    (bad / "chat_template.jinja").write_text(resources.files("peftkit.data").joinpath("templates/chatml.jinja")
                                             .read_text())
    command, _ = vllm_hand_off(bad, "x")
    assert f"--chat-template {bad / 'chat_template.jinja'} --enable-auto-tool-choice --tool-call-parser hermes" \
        in command
    assert "--reasoning-parser" not in command  # vLLM's parser refuses to start without <think> tokens
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}, "added_tokens": [
        {"id": 1, "content": "<think>"}, {"id": 2, "content": "</think>"}]}))
    command, _ = vllm_hand_off(bad, "x")
    assert "--tool-call-parser hermes --reasoning-parser deepseek_r1" in command


def test_serve_engine_vllm_execs_one_checked_vllm_server_for_every_adapter(two_adapters: dict[str, str],
                                                                        tmp_path: Path) -> None:
    """`peftkit serve --engine vllm` replaces itself with `vllm serve` (a stand-in here, as $PEFTKIT_VLLM)."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "vllm").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/argv.txt\n")
    (fake / "vllm").chmod(0o755)
    adapters = [f"{n}={p}" for n, p in two_adapters.items()]
    cmd = [sys.executable, "-m", "peftkit", "serve", "--engine", "vllm", "--port", "8123",
           *[a for spec in adapters for a in ("--adapter", spec)]]
    env = {**os.environ, "PEFTKIT_VLLM": str(fake / "vllm")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv.txt").read_text().split()
    config = json.loads((Path(two_adapters["ner"]) / "adapter_config.json").read_text())
    assert argv[:2] == ["serve", config["base_model_name_or_path"]]
    at = argv.index("--lora-modules")
    assert argv[at + 1:at + 3] == adapters and argv[-4:] == ["--host", "127.0.0.1", "--port", "8123"]
    missing = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120,
                             env={**os.environ, "PEFTKIT_VLLM": str(tmp_path / "nowhere")})
    assert missing.returncode == 2 and "no vllm executable there" in missing.stderr and "make vllm" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_shared_prefix_is_computed_once_and_changes_no_answer(model_and_tok) -> None:
    model, tok = model_and_tok
    system = [{"role": "system", "content": "You extract entities from resumes and answer in JSON only."}]
    prompts = [render_prompt(tok, system + [{"role": "user", "content": t}]) for t in TEXTS]
    computed: list[int] = []
    real = model.forward

    def counting(*a, **k):
        computed.append(k["input_ids"].numel())
        return real(*a, **k)

    model.forward = counting
    engine = Engine(model, tok, slots=3, max_len=160)
    jobs = engine.generate(prompts, Sampling(max_new_tokens=7))
    assert len(engine.prefix) >= 10 and all(p[: len(engine.prefix)] == engine.prefix for p in prompts)
    with_prefix = sum(computed)
    computed.clear()
    plain = Engine(model, tok, slots=3, max_len=160)
    plain.set_prefix = lambda ids: None  # no prefix cache
    assert [j.tokens for j in plain.generate(prompts, Sampling(max_new_tokens=7))] == [j.tokens for j in jobs]
    # the same schedule, less computed: the prefix once instead of once per prompt
    assert with_prefix == sum(computed) - (len(prompts) - 1) * len(engine.prefix)


def test_a_request_past_its_timeout_ends_with_what_it_has(slow_app) -> None:
    from fastapi.testclient import TestClient

    app, service = slow_app
    service.request_timeout = 0.6
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "temperature": 1.0,
            "seed": 1}
    start = time.time()
    reply = TestClient(app).post("/v1/chat/completions", json=body).json()
    assert time.time() - start < 5  # 400 tokens at 30 ms would take 12 s
    assert reply["choices"][0]["finish_reason"] == "length" and 0 < reply["usage"]["completion_tokens"] < 400
    time.sleep(0.2)
    assert not service.engine.active  # the row was freed


# ---- JSON mode ------------------------------------------------------------------------------------------


DOCS = ['{"姓名": ["吴重阳"], "国籍": ["中国国籍"]}', '{"a": [1, -2.5e+3, true, false, null, {"b": "x\\"y\\u00e9"}], "c": {}}',
        "{}", ' { "k" : [ ] } ']


@pytest.mark.parametrize("doc", DOCS)
def test_json_prefixes_are_accepted_and_closed_into_valid_json(doc: str) -> None:
    from peftkit.infer.json_mode import JsonState, closing, feed

    for cut in range(len(doc) + 1):
        state = feed(JsonState(), doc[:cut])
        assert state is not None, doc[:cut]
        assert isinstance(json.loads(doc[:cut] + closing(state)), dict)
    assert feed(JsonState(), doc).complete


@pytest.mark.parametrize("bad", ["[1]", '{"a" 1}', '{"a": 01}', "{a: 1}", '{"a": tru }', '{"a": 1,}', '{"a": 1}}', '"x"',
                                 '{"a": "\x01"}', '{"a": 1.}', '{"a": -}'])
def test_what_no_json_object_starts_with_is_refused(bad: str) -> None:
    from peftkit.infer.json_mode import JsonState, feed

    state = feed(JsonState(), bad)
    assert state is None or not state.complete


def test_json_mode_answers_always_parse(model_and_tok) -> None:
    model, tok = model_and_tok
    prompts = _prompts(tok)
    engine = Engine(model, tok, slots=4, max_len=200)
    budgets = [2, 3, 5, 8, 12, 20, 40, 60]
    for temperature in (0.0, 1.2):
        samplings = [Sampling(max_new_tokens=b, temperature=temperature, seed=i, json=True) for i, b in enumerate(budgets)]
        for job, budget in zip(engine.generate(prompts, samplings), budgets):
            text = tok.decode(job.tokens, skip_special_tokens=True)
            assert isinstance(json.loads(text), dict), (budget, text)
            assert len(job.tokens) <= budget


def test_serve_json_object_response_format(slow_app) -> None:
    from fastapi.testclient import TestClient

    app, _ = slow_app
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
            "response_format": {"type": "json_object"}}
    reply = TestClient(app).post("/v1/chat/completions", json=body).json()
    assert isinstance(json.loads(reply["choices"][0]["message"]["content"]), dict)


def test_an_engine_error_fails_the_requests_in_flight_and_the_engine_goes_on(model_and_tok) -> None:
    model, tok = model_and_tok
    real, calls = model.forward, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    model.forward = flaky
    engine = Engine(model, tok, slots=2, max_len=128)
    engine.start()
    try:
        job = engine.submit(_prompts(tok)[0], Sampling(max_new_tokens=10))
        with pytest.raises(RuntimeError, match="boom"):
            job.result(timeout=30)
        assert job.finish_reason == "error"
        assert len(engine.submit(_prompts(tok)[1], Sampling(max_new_tokens=5)).result(timeout=30)) == 5
    finally:
        engine.close()


def test_serve_caches_the_template_opening_and_answers_as_without_it(tiny_model_dir: Path) -> None:
    """The keys / values of what every request starts with (the default system prompt) are computed once; answers
    (greedy) equal a server without the cache, for requests with and without their own system message."""
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.serve.app import create_app
    from peftkit.serve.service import Service, template_opening

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant named "
                         "Tiny, made for the tests of peftkit<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>"
                         "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                         "<|im_start|>assistant\n{% endif %}")
    answers = {}
    for cached in (True, False):
        service = Service(model, tok, 512, slots=4)
        if cached:
            assert service.engine.prefix == template_opening(tok) and len(service.engine.prefix) >= 8
        else:
            service.engine.set_prefix([])
        client = TestClient(create_app(service, "tiny"))
        out = []
        for messages in ([{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Count."}],
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]):
            body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0}
            out.append(client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"])
        answers[cached] = out
        assert (service.engine._prefix_kv is not None) == cached  # the cached path really ran
        service.close()
    assert answers[True] == answers[False]


def test_a_kv_cache_that_does_not_fit_is_refused_at_start(model_and_tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's rows × tokens are checked against the KV budget before anything is allocated (a server that
    reserved more than the machine has stopped answering, even /health); serve's default context is shortened to
    what fits, an asked-for one that does not fit is refused; a batch job runs fewer rows at a time."""
    from peftkit.infer.engine import engine_for
    from peftkit.infer.kv import KV_CACHE_ENV, fitting_context, kv_bytes_per_token

    model, tok = model_and_tok
    per_token = kv_bytes_per_token(model)
    config = model.config.get_text_config()
    assert per_token == 2 * config.num_hidden_layers * config.num_key_value_heads * \
        (config.hidden_size // config.num_attention_heads) * 4  # float32 keys and values
    monkeypatch.setenv(KV_CACHE_ENV, str(per_token * 4 * 300 / 2**30))  # 4 rows of 300 tokens
    with pytest.raises(PeftkitError, match=r"KV cache for 4 rows of 512 tokens needs .* GiB.*--slots.*PEFTKIT_KV_CACHE_GIB"):
        Engine(model, tok, slots=4, max_len=512)
    Engine(model, tok, slots=4, max_len=300)
    batch = engine_for(model, tok, [[1] * 90] * 10, max_new_tokens=59, slots=8)  # 150 tokens a row: 8 of 10 fit
    assert batch.slots == 8
    assert engine_for(model, tok, [[1] * 240] * 10, max_new_tokens=59, slots=8).slots == 4  # 300 a row: 4 fit
    assert fitting_context(model, slots=4, dtype=None) == 256  # the model's 512 shortened to a multiple of 256
    assert fitting_context(model, slots=4, dtype=None, wanted=300) == 300
    with pytest.raises(PeftkitError, match="rows of 400 tokens"):
        fitting_context(model, slots=4, dtype=None, wanted=400)
    monkeypatch.setenv(KV_CACHE_ENV, "lots")
    with pytest.raises(PeftkitError, match="a number of GiB"):
        Engine(model, tok, slots=4, max_len=300)


def test_serve_refuses_rows_that_do_not_fit_before_serving(tiny_model_dir: Path) -> None:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "peftkit", "serve", "--model", str(tiny_model_dir), "--slots", "64",
                           "--max-model-len", "400", "--port", "8124"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PEFTKIT_KV_CACHE_GIB": "0.0001"}, check=False)
    assert proc.returncode == 2 and "KV cache for 64 rows of 400 tokens" in proc.stderr and "Traceback" not in proc.stderr
