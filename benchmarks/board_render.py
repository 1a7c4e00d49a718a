"""How long the board takes to show a run with many log lines: the API call and the page in headless Chromium.

Writes a synthetic run (N log lines with the fields LogCallback writes, an eval line every 50 steps),
serves the board on it, and measures: GET /api/runs (list), GET /api/runs/{id}/log (all lines, size),
and the run page's first render (fetch + parse + charts) as the page itself times it, median of --repeats.

    python benchmarks/board_render.py [--lines 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path


def write_run(run: Path, lines: int) -> None:
    run.mkdir(parents=True)
    t0 = time.time() - lines
    rows = [{"v": 2, "event": "train_begin", "current_steps": 0, "total_steps": lines, "time": t0, "pid": 0}]
    for step in range(1, lines + 1):
        rows.append({"v": 2, "event": "log", "current_steps": step, "total_steps": lines,
                     "loss": 2.0 * math.exp(-step / lines) + 0.1 * math.sin(step), "eval_loss": None, "reward": None,
                     "learning_rate": 2e-4 * (1 - step / lines), "grad_norm": 1.0, "epoch": step / 500,
                     "percentage": round(100 * step / lines, 2), "elapsed_time": "0:10:00", "remaining_time": "0:00:00",
                     "elapsed_seconds": step, "remaining_seconds": lines - step, "peak_memory_mb": 5000.0,
                     "time": t0 + step, "tokens_seen": 4096 * step, "real_tokens_seen": 4000 * step,
                     "supervised_tokens_seen": 3000 * step, "tokens_per_second": 400.0})
        if step % 50 == 0:
            rows.append({**rows[-1], "event": "eval", "loss": None, "eval_loss": rows[-1]["loss"] + 0.1,
                         "eval_accuracy": 0.5 + 0.4 * step / lines})
    rows.append({**rows[-1], "event": "train_end", "status": "finished"})
    (run / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text("stage: sft\ntrain: {learning_rate: 0.0002}\n")


def main() -> None:
    import httpx
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from peftkit.board.app import create_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    runs = Path(tempfile.mkdtemp()) / "outputs"
    write_run(runs / "big", args.lines)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(runs), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/"

    def timed(path: str) -> tuple[float, int]:
        start = time.perf_counter()
        r = httpx.get(url + path, timeout=60)
        r.raise_for_status()
        return (time.perf_counter() - start) * 1000, len(r.content)

    first_log_ms, _ = timed("api/runs/big/log")  # parses the file once; later calls read only new lines
    log_ms, log_bytes = zip(*(timed("api/runs/big/log") for _ in range(args.repeats)))
    list_ms = [timed("api/runs")[0] for _ in range(args.repeats)]
    new_lines_ms = [timed(f"api/runs/big/log?since={args.lines}")[0] for _ in range(args.repeats)]

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    page_ms = []
    try:
        for _ in range(args.repeats):
            driver.get(url + "#/run/big")
            deadline = time.time() + 60
            while (ms := driver.execute_script("return window.peftkitRenderedMs")) is None and time.time() < deadline:
                time.sleep(0.05)
            page_ms.append(ms)
            driver.get("about:blank")
    finally:
        driver.quit()
        server.should_exit = True

    print(f"run with {args.lines} log lines (+{args.lines // 50} eval lines); median of {args.repeats}")
    print("| what | ms |\n|---|---|")
    print(f"| GET /api/runs/big/log, first read (parse the file) | {first_log_ms:.0f} |")
    print(f"| GET /api/runs/big/log, all lines ({log_bytes[0] / 2**20:.1f} MiB) | {statistics.median(log_ms):.0f} |")
    print(f"| GET /api/runs/big/log?since=N (a poll with nothing new) | {statistics.median(new_lines_ms):.1f} |")
    print(f"| GET /api/runs (the list) | {statistics.median(list_ms):.1f} |")
    print(f"| run page in Chromium: fetch + parse + draw 4 charts | {statistics.median(page_ms):.0f} |")


if __name__ == "__main__":
    main()
