"""Serve: an OpenAI-compatible HTTP API over a base model, base + adapter(s), or a merged folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

logger = logging.getLogger("peftkit")


def named_adapters(specs: list[str]) -> dict[str, str]:
    """`--adapter RUN` or `--adapter NAME=RUN`, repeatable: served name → run folder (name: the folder's)."""
    named: dict[str, str] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or Path(path).name
        if name in named:
            raise PeftkitError(f"--adapter {spec}: the name {name!r} is given twice; use NAME=RUN to tell them apart")
        named[name] = path
    return named


def load_served(spec: tuple[Any, list[str], str, str | None]) -> tuple[Any, Any, dict[str, str | None]]:
    """(model, tokenizer, served name → peft adapter name) for `spec` (load_for_chat's arguments, with a list
    of adapters). One adapter is merged into the weights in memory (the run is untouched): one matmul per
    projection; on a quantized base it stays unmerged. Several are loaded side by side, unmerged; each
    request's model picks its adapter."""
    from peftkit.infer.chat import load_for_chat

    model_args, adapters, stage, template = spec
    named = named_adapters(adapters)
    first = next(iter(named.values()), None)
    model, tokenizer = load_for_chat(model_args, first, stage, template)
    if len(named) <= 1:
        from peftkit.infer.merging import merged

        model = merged(model)
        name = next(iter(named), None) or Path(model_args.name_or_path).name
        return model, tokenizer, {name: None}
    peft_names: dict[str, str | None] = {}
    for k, (name, path) in enumerate(named.items()):
        if k:
            model.load_adapter(path, adapter_name=name)
        peft_names[name] = name if k else "default"
    return model, tokenizer, peft_names


@dataclass(frozen=True)
class ServeOptions:
    """`peftkit serve`'s options for peftkit's own engine (the CLI flags of the same names)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    served_name: str | None = None  # --served-model-name: one model's name in /v1/models
    slots: int = 16  # rows of the running batch
    max_queue: int = 64
    request_timeout: float = 600
    max_model_len: int | None = None  # the context window; None: the model's, shortened to what the KV budget holds
    dtype: str | None = None  # the weights' dtype while serving; None: as loaded (float32)
    image_root: Path | None = None  # --image-root: local image paths in requests are read only under it


def serve(spec: tuple[Any, list[str], str, str | None], o: ServeOptions) -> None:
    """Load the model once and serve it until interrupted."""
    import uvicorn

    from peftkit.serve.app import create_app
    from peftkit.serve.service import Service

    model, tokenizer, served = load_served(spec)
    if o.served_name is not None:
        if len(served) > 1:
            raise PeftkitError("--served-model-name names one model; with several adapters use --adapter NAME=RUN")
        served = {o.served_name: next(iter(served.values()))}
    from peftkit.infer.kv import fitting_context, model_context

    if o.dtype is not None:  # stored once in that dtype: bf16 autocast would cast the float32 weights every step
        import torch  # (served the demo adapter 2x slower than float32, benchmarks/RESULTS.md)

        model.to(getattr(torch, o.dtype))
    context = fitting_context(model, o.slots, None, o.max_model_len)  # refused here, before serving, when it cannot fit
    adapters = [a for a in served.values() if a is not None] or None
    from peftkit.config.schema import ModelArgs
    from peftkit.model.loading import load_processor
    from peftkit.serve.service import ImageInput

    base = spec[0] if isinstance(spec[0], ModelArgs) else ModelArgs(name_or_path=spec[0])
    images = ImageInput(load_processor(base), o.image_root)  # an image-text model reads image parts
    service = Service(model, tokenizer, context, slots=o.slots, max_queue=o.max_queue, adapters=adapters,
                      request_timeout=o.request_timeout, images=images)
    app = create_app(service, served, api_key=o.api_key, max_tokens_limit=o.max_tokens_limit)
    full = model_context(model)
    logger.info("serving %s on http://%s:%d/v1 (context window %d tokens%s, %d rows, queue %d)%s",
                ", ".join(map(repr, served)), o.host, o.port, context,
                f" of the model's {full}: what the KV cache budget holds" if context < full else "", o.slots, o.max_queue,
                "" if o.api_key else " without an API key")
    try:
        uvicorn.run(app, host=o.host, port=o.port, log_level="warning")
    finally:
        service.close()
