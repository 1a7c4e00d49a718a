"""Which model, adapters and engine `peftkit chat` / `serve` / `eval` run: from --config, --model, --adapter, --engine."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from peftkit.constants import EMBEDDED_MODEL
from peftkit.errors import PeftkitError

logger = logging.getLogger("peftkit")


def eval_engine(args: argparse.Namespace, cfg: Any) -> str:
    """--engine peftkit | vllm | auto for eval: vllm refused with the reason where it cannot do this eval; auto
    takes vLLM where it can, and says which it took."""
    if args.engine == "peftkit":
        return "peftkit"
    from peftkit.eval.predict import needs_the_model
    from peftkit.model.resolve import resolve_model
    from peftkit.serve.vllm import vllm_unusable

    why = needs_the_model(cfg) or vllm_unusable(args.adapter or resolve_model(cfg.model.name_or_path))
    if why and args.engine == "vllm":
        raise PeftkitError(f"--engine vllm: {why}")
    logger.info("eval engine: %s", f"peftkit ({why})" if why else "vllm")
    return "peftkit" if why else "vllm"


def model_spec(args: argparse.Namespace) -> tuple[Any, Any, str, str | None]:
    """(ModelArgs, adapter, stage, data.template) for chat / serve: from --config when given (its model.dtype,
    attn_implementation, trust_remote_code, template and stage), --model naming another model or folder."""
    from dataclasses import replace

    from peftkit.config import load_config
    from peftkit.config.schema import ModelArgs

    if args.config is None:
        if args.adapter and not args.model:  # the run's own base model, stage and template
            return _run_spec(args.adapter)
        return ModelArgs(name_or_path=args.model or EMBEDDED_MODEL), args.adapter, "sft", None
    cfg = load_config(args.config, args.overrides)
    if args.model:
        return replace(cfg.model, name_or_path=args.model), args.adapter, cfg.stage, cfg.data.template
    return (*run_model(cfg.model, args.adapter), cfg.stage, cfg.data.template)


def run_model(model: Any, adapter: Any) -> tuple[Any, Any]:
    """(ModelArgs, adapter) that load `adapter` (a run folder, or serve's list of them) with the config's model
    settings: a LoRA run on the base it trained on (adapter_config.json; said when model.name_or_path names another,
    which would not load), a freeze / full run as the model itself."""
    if not adapter:
        return model, adapter
    run = _first_run(adapter)
    if run.is_adapter:
        from pathlib import Path

        from peftkit.model.resolve import resolve_model

        if Path(run.base_model).resolve() != Path(resolve_model(model.name_or_path)).resolve():
            logger.info("--adapter %s trained on %s: loading that base (not model.name_or_path=%s)", run.path,
                        run.base_model, model.name_or_path)
    return _on_run(model, run, adapter)


def _run_spec(adapter: str | list[str]) -> tuple[Any, Any, str, str | None]:
    """model_spec for `--adapter RUN` alone: the (first) run's base model as it trained, its stage and template; a
    freeze / full run is itself the model."""
    run = _first_run(adapter)
    return (*_on_run(run.model, run, adapter), run.stage, run.template)


def _first_run(adapter: Any) -> Any:
    """The run of `--adapter RUN` (serve's first, when several are given)."""
    from peftkit.rundir import read_run
    from peftkit.serve import named_adapters

    return read_run(next(iter(named_adapters(adapter if isinstance(adapter, list) else [adapter]).values())))


def _on_run(model: Any, run: Any, adapter: Any) -> tuple[Any, Any]:
    """`model`'s settings on the run: a LoRA run's base with its adapter(s), or a freeze / full run itself, alone."""
    from dataclasses import replace

    if run.is_adapter:
        return replace(model, name_or_path=run.base_model), adapter
    return replace(model, name_or_path=str(run.path), quantization_bit=None), [] if isinstance(adapter, list) else None


def serve_dtype(choice: str) -> str | None:
    """--dtype for peftkit's engine: None keeps the weights' float32. On a native-bf16 CPU, bf16 weights served the
    demo adapter at 1.45 requests/s against float32's 1.0 (64 clients, 64 rows; benchmarks/RESULTS.md)."""
    if choice == "auto":
        from peftkit.config.load import bf16_is_fast

        choice = "bfloat16" if bf16_is_fast() else "float32"
    return None if choice == "float32" else choice


def serve_engine(args: argparse.Namespace) -> str:
    """--engine auto for serve: vLLM where it is installed and takes every run, else peftkit's; the choice said."""
    if args.engine != "auto":
        return args.engine
    from peftkit.serve import named_adapters
    from peftkit.serve.vllm import adapter_blocks, vllm_unusable

    runs = list(named_adapters(args.adapter).values()) if args.adapter else [args.model or ""]
    why = None if all(runs) else "no --adapter or --model folder"
    for run in runs if why is None else []:
        blocks = adapter_blocks(run) if len(runs) > 1 else []  # one run is served merged: no LoRA rules
        why = why or vllm_unusable(run) or (blocks[0] if blocks else None)
    logger.info("serve engine: %s", f"peftkit ({why})" if why else "vllm")
    return "peftkit" if why else "vllm"
