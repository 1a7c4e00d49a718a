"""The board: a local web app to watch, compare, start, stop and resume the runs under one folder."""

from __future__ import annotations

import logging
from pathlib import Path

from peftkit.errors import PeftkitError

logger = logging.getLogger("peftkit")


def board(runs_dir: Path, host: str, port: int, token: str | None, loopback: bool) -> None:
    """Serve the board with uvicorn until interrupted; off loopback only with a token."""
    import uvicorn

    from peftkit.board.app import create_app

    if not loopback and not token:
        raise PeftkitError(f"refusing to serve the board on {host} without a token: anyone reaching it could start "
                           "and stop runs. Pass --token T (or set PEFTKIT_BOARD_TOKEN), or keep --host 127.0.0.1")
    if not runs_dir.is_dir():
        raise PeftkitError(f"RUNS_DIR {runs_dir} is not a folder (the output_dir of runs, e.g. outputs/)")
    shown = host if ":" not in host else f"[{host}]"
    logger.info("peftkit board for %s on http://%s:%d/%s", runs_dir.resolve(), shown, port,
                f"?token={token}" if token else "")
    uvicorn.run(create_app(runs_dir, token), host=host, port=port, log_level="warning")
