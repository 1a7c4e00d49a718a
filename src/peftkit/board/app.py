"""The board's HTTP app: JSON endpoints over RUNS_DIR, the static page, and run control.

GET  /api/runs                       every run, newest first (status, progress, ETA, last loss, best eval)
GET  /api/runs/{id}                  one run: summary, config.yaml, data_report.json, files, console tail
GET  /api/runs/{id}/log?since=N      log lines from line N on (the page polls this: only new lines travel;
                                     `file` changes when a resume rewrites the log: read it again from 0)
GET  /api/runs/{id}/files/{name}     a file of the run folder (training_loss.png, predictions, ...)
GET  /api/compare?ids=a&ids=b        the differing config keys of several runs
GET  /api/configs                    config files the board may launch
POST /api/runs {config, overrides}   start `peftkit train`; POST /api/runs/{id}/stop | /resume

Without a token only loopback Host names are answered (no DNS rebinding), and a POST from another
origin is refused (no cross-site start / stop). With a token, every request carries it (Authorization: Bearer,
the cookie set by opening /?token=...,
or ?token=). A run id is its folder relative to RUNS_DIR; anything that resolves outside is a 404.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from peftkit.board.control import ControlError, Launcher
from peftkit.board.runs import (
    config_diff,
    confined,
    discover,
    process_alive,
    read_config,
    read_json,
    run_files,
    summarise,
)
from peftkit.constants import DATA_REPORT_FILE, RUN_SUMMARY_FILE, TRAINER_LOG
from peftkit.hosts import is_loopback
from peftkit.train.logfile import RunLog

STATIC = Path(__file__).parent / "static"
_COOKIE = "peftkit_board_token"
_MEDIA = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def _token_guard(token: str | None) -> Any:
    """The middleware: no cross-site writes; without a token, loopback host names only; with one, the token."""

    async def require_token(request: Request, call_next: Any) -> Any:
        host = request.headers.get("host", "")
        origin = request.headers.get("origin")
        if request.method != "GET" and origin and urlsplit(origin).netloc != host:
            return JSONResponse({"error": "cross-site request refused"}, status_code=403)
        if token is None:
            if not is_loopback(urlsplit(f"//{host}").hostname):  # a DNS-rebinding page, or an unexpected proxy
                return JSONResponse({"error": f"host {host!r} refused: without a token the board answers "
                                              "loopback names only"}, status_code=403)
            return await call_next(request)
        given = (request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                 or request.cookies.get(_COOKIE) or request.query_params.get("token") or "")
        if not secrets.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "this board needs its token: open /?token=... or send "
                                          "Authorization: Bearer ..."}, status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(_COOKIE, token, httponly=True, samesite="strict")
        return response

    return require_token


class _Board:
    """The runs under runs_dir: their logs (read incrementally), ids, and live state."""

    def __init__(self, runs_dir: Path, launcher: Launcher) -> None:
        self.runs_dir, self.launcher = runs_dir, launcher
        self.logs: dict[Path, RunLog] = {}

    def log_of(self, run_dir: Path) -> list[dict[str, Any]]:
        log = self.logs.get(run_dir)
        if log is None:
            log = self.logs[run_dir] = RunLog(run_dir / TRAINER_LOG)
        return log.refresh()

    def run_id(self, run_dir: Path) -> str:
        return run_dir.relative_to(self.runs_dir).as_posix()

    def resolve(self, rid: str) -> Path:
        run_dir = confined(self.runs_dir, rid)
        if run_dir is None or run_dir == self.runs_dir or not (
                (run_dir / TRAINER_LOG).is_file() or self.launcher.child(run_dir) is not None):
            raise ControlError(404, f"no run {rid!r}")
        return run_dir

    def info(self, run_dir: Path) -> dict[str, Any]:
        lines = self.log_of(run_dir)
        child = self.launcher.child(run_dir)
        if child is not None and child.process.returncode is None:
            alive: bool | None = True
        elif child is not None and not lines:
            alive = False
        else:
            alive = process_alive(lines)
        out = summarise(self.run_id(run_dir), lines, alive, run_dir).__dict__
        if child is not None and child.process.returncode not in (None, 0) and out["status"] == "running":
            out["status"] = "failed"
        out["skipped_lines"] = self.logs[run_dir].skipped
        return out

    def file(self, rid: str, name: str) -> Path:
        run_dir = self.resolve(rid)
        path = confined(run_dir, name)
        if path is None or path.parent != run_dir or not path.is_file():
            raise ControlError(404, f"no file {name!r} in run {rid!r}")
        return path

    def stop(self, rid: str) -> None:
        run_dir = self.resolve(rid)
        state = self.info(run_dir)
        if state["status"] not in ("running", "starting"):
            raise ControlError(409, f"run {rid!r} is {state['status']}, not running")
        # a pid from the log is signalled only if it is a live peftkit process here (not one of another host)
        self.launcher.stop(run_dir, state["pid"] if process_alive(self.log_of(run_dir)) else None)

    def resume(self, rid: str) -> None:
        run_dir = self.resolve(rid)
        state = self.info(run_dir)
        if not state["resumable"]:
            raise ControlError(409, f"run {rid!r} is {state['status']} and cannot be resumed "
                                    "(only a stopped or failed run with a checkpoint can)")
        self.launcher.resume(run_dir)

    def all_runs(self) -> list[Path]:
        children = self.launcher.children
        found = set(discover(self.runs_dir)) | {d for d in children if d.is_relative_to(self.runs_dir)}
        return sorted(found, key=lambda d: _mtime(d / TRAINER_LOG) or children[d].started, reverse=True)


def create_app(runs_dir: Path, token: str | None = None, root: Path | None = None) -> FastAPI:
    """The board for runs_dir; configs are launched from root (default: runs_dir's parent)."""
    runs_dir = runs_dir.resolve()
    launcher = Launcher(runs_dir, root or runs_dir.parent)
    board = _Board(runs_dir, launcher)
    app = FastAPI(title="peftkit board", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.launcher = launcher
    app.middleware("http")(_token_guard(token))

    @app.exception_handler(ControlError)
    async def control_error(request: Request, e: ControlError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    # registered in this order: /api/runs/{rid:path} matches any deeper path, so it comes last
    _page_routes(app)
    _list_routes(app, board)
    _run_routes(app, board)
    return app


def _page_routes(app: FastAPI) -> None:
    """The page and its static files, apart from the API so each route table stays readable."""

    @app.get("/")
    def index() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        path = STATIC / name
        if "/" in name or path.suffix not in _MEDIA or not path.is_file():
            raise ControlError(404, f"no static file {name!r}")
        return FileResponse(path, media_type=_MEDIA[path.suffix])


def _list_routes(app: FastAPI, board: _Board) -> None:
    """The endpoints over all runs and configs (list, launch, compare): none of them names one run."""
    runs_dir, launcher = board.runs_dir, board.launcher

    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        return {"runs_dir": str(runs_dir), "runs": [board.info(d) for d in board.all_runs()]}

    @app.get("/api/configs")
    def configs() -> dict[str, Any]:
        return {"root": str(launcher.root), "configs": launcher.configs()}

    @app.post("/api/runs")
    async def start(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        config, overrides = body.get("config"), body.get("overrides") or []
        if not isinstance(config, str) or not isinstance(overrides, list):
            raise ControlError(400, 'the body must be {"config": "path/to/config.yaml", "overrides": ["k=v", ...]}')
        run_dir = launcher.start(config, overrides)
        return {"id": board.run_id(run_dir)}

    @app.get("/api/compare")
    def compare(ids: Annotated[tuple[str, ...], Query()] = ()) -> dict[str, Any]:
        dirs = [board.resolve(i) for i in ids]
        return {"ids": [board.run_id(d) for d in dirs], "config_diff": config_diff([read_config(d)[1] for d in dirs])}


def _run_routes(app: FastAPI, board: _Board) -> None:
    """The endpoints of one run (log, files, stop, resume, details); the catch-all details route is added last."""
    launcher = board.launcher

    @app.get("/api/runs/{rid:path}/log")
    def log(rid: str, since: int = 0) -> dict[str, Any]:
        run_dir = board.resolve(rid)
        lines = board.log_of(run_dir)
        since = since if 0 <= since <= len(lines) else 0  # a rewritten (resumed) log: start over
        return {"since": since, "next": len(lines), "lines": lines[since:], "file": board.logs[run_dir].file_id}

    @app.get("/api/runs/{rid:path}/files/{name}")
    def file(rid: str, name: str) -> Response:
        path = board.file(rid, name)
        return FileResponse(path, filename=path.name if path.suffix != ".png" else None)

    @app.post("/api/runs/{rid:path}/stop")
    def stop(rid: str) -> dict[str, Any]:
        board.stop(rid)
        return {"id": rid, "signal": "SIGTERM"}

    @app.post("/api/runs/{rid:path}/resume")
    def resume(rid: str) -> dict[str, Any]:
        board.resume(rid)
        return {"id": rid}

    @app.get("/api/runs/{rid:path}")
    def run(rid: str) -> dict[str, Any]:
        run_dir = board.resolve(rid)
        text, _ = read_config(run_dir)
        return {**board.info(run_dir), "config": text, "data_report": read_json(run_dir / DATA_REPORT_FILE),
                "files": run_files(run_dir), "summary": read_json(run_dir / RUN_SUMMARY_FILE),
                "console": launcher.console_tail(run_dir)}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as e:
        raise ControlError(400, "the request body must be JSON") from e
    if not isinstance(body, dict):
        raise ControlError(400, "the request body must be a JSON object")
    return body
