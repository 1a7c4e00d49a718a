"""Serve: an OpenAI-compatible HTTP API over a base model, base + adapter, or a merged folder."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("peftkit")


def serve(model_name: str, adapter: str | None, host: str, port: int, api_key: str | None,
          max_tokens_limit: int, served_name: str | None) -> None:
    """Load the model once and serve it with uvicorn until interrupted."""
    import uvicorn

    from peftkit.infer.chat import load_for_chat
    from peftkit.serve.app import create_app
    from peftkit.serve.engine import Engine

    model, tokenizer = load_for_chat(model_name, adapter)
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    name = served_name or Path(adapter or model_name).name
    app = create_app(Engine(model, tokenizer, context), name, api_key=api_key, max_tokens_limit=max_tokens_limit)
    logger.info("serving %r on http://%s:%d/v1 (context window %d tokens)%s", name, host, port, context,
                "" if api_key else " without an API key")
    uvicorn.run(app, host=host, port=port, log_level="warning")
