"""The board in headless Chromium: start a run, watch it update live, stop it, resume it, see it finish.

Needs Debian's chromium and chromium-driver (.ci/run installs them). The screenshot of the finished
run is kept in the test's tmp dir (the path is printed) as the CI artifact.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ALPACA_RECORDS

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver: "
                                "apt-get install chromium chromium-driver (.ci/run installs them)")


@pytest.fixture()
def project(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with data, a config whose run takes a while on the tiny model, and outputs/."""
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    root = tmp_path / "project"
    (root / "outputs").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "train.json").write_text(json.dumps(ALPACA_RECORDS * 8))
    (root / "configs" / "slow.yaml").write_text(
        f"model: {{name_or_path: {tiny_model_dir}}}\n"
        "data: {train: train.json, cutoff_len: 64}\n"
        "train: {output_dir: outputs/slow, max_steps: 3000, per_device_train_batch_size: 2, logging_steps: 20, "
        "save_strategy: 'no', disable_tqdm: true}\n")
    return root


@pytest.fixture()
def board_url(project: Path):
    import uvicorn

    from peftkit.board.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(project / "outputs")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)
    app.state.launcher.kill_all()  # a failed test leaves no training behind


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_start_watch_stop_resume_finish(board_url: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def wait(condition, timeout: float = 120):
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda d: condition())

    # read through JS in one call: the page re-renders parts while it polls (no stale element handles)
    def status() -> str:
        return browser.execute_script("return document.querySelector('#status [data-status]')?.dataset.status || ''")

    def loss_points() -> int:
        return browser.execute_script(
            "return +(document.querySelector('#loss-chart path[data-series=\"loss\"]')?.dataset.points || 0)")

    def progress() -> float:
        return browser.execute_script("return parseFloat(document.querySelector('#progress .bar > div')?.style.width || 0)")

    browser.get(board_url)
    wait(lambda: "configs/slow.yaml" in [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#config option")])
    Select(browser.find_element(By.ID, "config")).select_by_visible_text("configs/slow.yaml")
    browser.find_element(By.ID, "start").click()
    wait(lambda: browser.current_url.endswith("#/run/slow"))
    browser.execute_script("window.sameDocument = true")  # gone if the page reloads

    wait(lambda: status() == "running" and loss_points() >= 1)
    first_points, first_progress = loss_points(), progress()
    wait(lambda: loss_points() > first_points and progress() > first_progress)  # live, no reload
    assert browser.execute_script("return window.sameDocument") is True
    assert 0 < progress() < 100

    browser.find_element(By.ID, "stop").click()
    wait(lambda: status() == "stopped")
    stopped_at = progress()
    assert stopped_at < 100, "the run finished before it could be stopped"
    wait(lambda: browser.find_element(By.ID, "resume").is_enabled(), 10)

    browser.find_element(By.ID, "resume").click()
    wait(lambda: status() in ("running", "finished") and progress() > stopped_at)
    wait(lambda: status() == "finished", 240)
    assert progress() == 100
    wait(lambda: "adapter_model.safetensors" in browser.find_element(By.ID, "files").text, 10)
    assert browser.execute_script("return window.sameDocument") is True
    assert "[[" not in browser.find_element(By.ID, "example").text  # supervised spans rendered as highlights
    assert browser.find_elements(By.CSS_SELECTOR, "#example mark")

    shot = tmp_path / "board_finished_run.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    browser.get(board_url + "#/")
    wait(lambda: browser.find_elements(By.CSS_SELECTOR, 'tr[data-run="slow"] [data-status="finished"]'))


def test_compare_two_runs(project: Path, board_url: str, browser) -> None:
    """Tick two runs in the list, compare: both loss curves overlaid and the differing config keys."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for name, lr in (("first", 0.01), ("second", 0.001)):
        run = project / "outputs" / name
        run.mkdir()
        (run / "config.yaml").write_text(f"stage: sft\ntrain: {{learning_rate: {lr}, max_steps: 3}}\n")
        (run / "trainer_log.jsonl").write_text("".join(json.dumps(
            {"event": "log", "current_steps": s, "total_steps": 3, "loss": lr * 100 / s}) + "\n" for s in (1, 2, 3)))
    browser.get(board_url)
    wait = WebDriverWait(browser, 30, poll_frequency=0.2)
    for name in ("first", "second"):
        wait.until(lambda d, n=name: d.find_elements(By.CSS_SELECTOR, f'tr[data-run="{n}"] input')).pop().click()
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#diff tbody tr"))
    series = browser.execute_script(
        "return [...document.querySelectorAll('#compare-chart path')].map(p => p.dataset.series)")
    assert "first (smoothed)" in series and "second (smoothed)" in series
    rows = browser.execute_script("return [...document.querySelectorAll('#diff tbody tr')].map(r => r.innerText)")
    assert rows == ["train.learning_rate\t0.01\t0.001"]


def test_stage_metrics_are_charted(project: Path, board_url: str, browser) -> None:
    """A grpo run's own metrics (each reward function, kl, completion length, clip ratio) get charts, grouped by
    the part of the key before "/"; the keys every run logs do not."""
    from selenium.webdriver.support.ui import WebDriverWait

    run = project / "outputs" / "grpo"
    run.mkdir()
    (run / "config.yaml").write_text("stage: grpo\n")
    (run / "trainer_log.jsonl").write_text("".join(json.dumps(
        {"event": "log", "current_steps": s, "total_steps": 3, "loss": 0.1, "reward": 0.5 + s / 10, "learning_rate": 1e-4,
         "rewards/ner_json_f1": 0.3 + s / 10, "rewards/json_valid": 1.0, "kl": 0.01 * s, "completion_length": 60 + s,
         "clip_ratio": 0.0}) + "\n" for s in (1, 2, 3)))
    browser.get(board_url + "#/run/grpo")
    wait = WebDriverWait(browser, 30, poll_frequency=0.2)
    wait.until(lambda d: d.execute_script("return document.querySelectorAll('.stage-chart').length") == 4)
    titles = browser.execute_script("return [...document.querySelectorAll('.stage-chart h3')].map(h => h.innerText)")
    assert titles == ["rewards", "kl", "completion_length", "clip_ratio"]
    series = browser.execute_script(
        "return [...document.querySelectorAll('.stage-chart path')].map(p => p.dataset.series)")
    assert {"rewards/ner_json_f1", "rewards/json_valid", "kl", "completion_length", "clip_ratio"} <= set(series)
