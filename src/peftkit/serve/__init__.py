"""Serve: an OpenAI-compatible HTTP API over a base model, base + adapter, or a merged folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("peftkit")


def serve(spec: tuple[Any, str | None, str, str | None], host: str, port: int, api_key: str | None,
          max_tokens_limit: int, served_name: str | None) -> None:
    """Load the model once (spec: load_for_chat's ModelArgs, adapter, stage, template) and serve it until interrupted."""
    import uvicorn

    from peftkit.infer.chat import load_for_chat
    from peftkit.serve.app import create_app
    from peftkit.serve.engine import Engine

    model, tokenizer = load_for_chat(*spec)
    adapter = spec[1]
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    name = served_name or Path(adapter or spec[0].name_or_path).name
    app = create_app(Engine(model, tokenizer, context), name, api_key=api_key, max_tokens_limit=max_tokens_limit)
    logger.info("serving %r on http://%s:%d/v1 (context window %d tokens)%s", name, host, port, context,
                "" if api_key else " without an API key")
    uvicorn.run(app, host=host, port=port, log_level="warning")
