"""Load on `peftkit serve`: concurrent clients with the official openai client, on loopback only.

    .venv/bin/python benchmarks/serve_load.py RUN_DIR [--clients 16] [--requests 16] [--max-tokens 128]
        [--overload 64 --max-queue 32] [--compare-src OLD_CHECKOUT/src] [--vllm]

Starts the server on a free 127.0.0.1 port, sends `--requests` resume-NER dev prompts from `--clients`
threads (every other one streaming; greedy), and prints requests/s, completion tokens/s and p50 / p95
latency. `--overload N` then fires N requests at once against `--max-queue`: the excess must get 429 and
everything admitted must be answered, within the time bound. `--compare-src` runs the same load against
another checkout's peftkit (e.g. a `git worktree` of the version before the engine), in the same run.
`--vllm` adds the same load on `peftkit serve --engine vllm` (vLLM from `make vllm`: the run merged into a cached
export, served with vLLM's defaults; its start-up, compilation included, is not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, src: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    env = {**os.environ, **({"PYTHONPATH": src} if src else {})}
    proc = subprocess.Popen([sys.executable, "-m", "peftkit", "serve", "--adapter", run, "--port", str(port),
                             "--served-model-name", "ner", *extra], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 600  # vLLM compiles the model at start (about 2 minutes on 2 cores)
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
    stop(proc)
    raise RuntimeError("the server did not start in 600 s")


def stop(proc: subprocess.Popen) -> None:
    """The server and what it started (vLLM's engine process): its whole session."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def prompts(n: int) -> list[list[dict[str, str]]]:
    records = json.loads((REPO / "data/resume_ner/dev.json").read_text(encoding="utf-8"))[:n]
    return [[{"role": "user", "content": r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")}] for r in records]


def one(client: Any, messages: list[dict[str, str]], stream: bool, max_tokens: int) -> tuple[float, int, int]:
    """(latency s, completion tokens, HTTP status)."""
    import openai

    start = time.time()
    try:
        if stream:
            chunks = list(client.chat.completions.create(model="ner", messages=messages, max_tokens=max_tokens,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
            usage = next((c.usage for c in reversed(chunks) if c.usage), None)
            tokens = usage.completion_tokens if usage else 0
        else:
            reply = client.chat.completions.create(model="ner", messages=messages, max_tokens=max_tokens, temperature=0)
            tokens = reply.usage.completion_tokens
        return time.time() - start, tokens, 200
    except openai.APIStatusError as e:
        return time.time() - start, 0, e.status_code


def load(base: str, clients: int, requests: int, max_tokens: int, timeout: float) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=timeout)
    asks = prompts(requests)
    start = time.time()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one(client, asks[i], i % 2 == 1, max_tokens), range(requests)))
    wall = time.time() - start
    ok = [r for r in results if r[2] == 200]
    latencies = sorted(r[0] for r in ok)
    return {"requests": requests, "answered": len(ok), "refused_429": sum(r[2] == 429 for r in results),
            "wall_s": round(wall, 1), "requests_per_s": round(len(ok) / wall, 2),
            "completion_tokens_per_s": round(sum(r[1] for r in ok) / wall, 1),
            "p50_s": round(statistics.median(latencies), 2) if latencies else None,
            "p95_s": round(latencies[max(0, int(0.95 * len(latencies)) - 1)], 2) if latencies else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--overload", type=int, default=64, help="0: skip the 429 check")
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--compare-src", help="another checkout's src/ to run the same load against first")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--vllm", action="store_true", help="also the same load on --engine vllm")
    parser.add_argument("--serve-args", default="", help="more `peftkit serve` flags for the engine's row, e.g. "
                        "'--dtype bfloat16'")
    args = parser.parse_args()

    rows = []
    servers = ([("before (" + args.compare_src + ")", args.compare_src, [])] if args.compare_src else []) + [
        (f"engine, {args.slots} rows {args.serve_args}".strip(), None,
         ["--slots", str(args.slots), "--max-queue", str(max(args.max_queue, args.requests)),
          *args.serve_args.split()])] + (
        [("vLLM (--engine vllm, merged)", None, ["--engine", "vllm"])] if args.vllm else [])
    for name, src, extra in servers:
        proc, base = start_server(args.run, src, extra)
        try:
            row = {"server": name, "clients": args.clients, **load(base, args.clients, args.requests, args.max_tokens,
                                                                  args.timeout)}
        finally:
            stop(proc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.overload:
        proc, base = start_server(args.run, None, ["--slots", str(args.slots), "--max-queue", str(args.max_queue)])
        try:
            row = {"server": f"engine, queue {args.max_queue}", "clients": args.overload,
                   **load(base, args.overload, args.overload, args.max_tokens, args.timeout)}
        finally:
            stop(proc)
        rows.append(row)
        print(json.dumps(row), flush=True)
        expected = args.overload - args.slots - args.max_queue
        print(f"overload: {row['refused_429']} refused with 429 (at least {max(0, expected)} expected: "
              f"{args.slots} rows + {args.max_queue} waiting), {row['answered']} answered, none lost: "
              f"{row['answered'] + row['refused_429'] == args.overload}")
    print("\n| server | clients | requests | answered | 429 | wall s | requests/s | completion tokens/s | p50 s | p95 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['answered']} | {r['refused_429']} | {r['wall_s']} | "
              f"{r['requests_per_s']} | {r['completion_tokens_per_s']} | {r['p50_s']} | {r['p95_s']} |")


if __name__ == "__main__":
    main()
