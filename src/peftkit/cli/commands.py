"""The other `peftkit` subcommands (data, eval, chat, export, serve, board, plot, model, version): one function each."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path

from peftkit import __version__
from peftkit.cli.models import eval_engine, model_spec, run_model, serve_dtype, serve_engine
from peftkit.errors import PeftkitError
from peftkit.hosts import is_loopback

logger = logging.getLogger("peftkit")


def cmd_data(args: argparse.Namespace) -> int:
    from peftkit.config import load_config
    from peftkit.data import apply_template, describe_example, prepare_data
    from peftkit.data.packing import unpack_row
    from peftkit.model import load_tokenizer
    from peftkit.model.loading import load_processor

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model)  # the tokenizer (and an image-text model's processor): no weights are loaded
    apply_template(tokenizer, cfg.data.template, cfg.stage)
    data = prepare_data(cfg.data, tokenizer, cfg.stage, load_processor(cfg.model))
    print(data.report.summary())
    from peftkit.model.quantization import estimate_memory

    estimate = estimate_memory(cfg.model)  # from config.json, on the meta device
    if estimate is not None:
        print(estimate.line())
    shown = 0
    for row in data.train:
        for example in unpack_row(row) if "position_ids" in row else [row]:
            if shown == args.n:
                return 0
            print(f"\n--- example {shown} ({len(example['input_ids'])} tokens, supervised in [[...]]) ---")
            print(describe_example(tokenizer, example))
            shown += 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from peftkit.config import load_config
    from peftkit.eval.predict import predict
    from peftkit.infer.chat import load_for_chat

    cfg = load_config(args.config, args.overrides)
    if not cfg.eval.dataset:
        raise PeftkitError("eval.dataset: missing — name the records to predict on, e.g. eval.dataset=data/dev.json")
    # Its own folder per dataset: never over the figures the run itself reported.
    out = Path(args.out) if args.out else Path(args.adapter or cfg.train["output_dir"]) / "eval" / Path(cfg.eval.dataset).stem
    if eval_engine(args, cfg) == "vllm":
        from peftkit.infer.chat import load_chat_tokenizer
        from peftkit.model.resolve import resolve_model
        from peftkit.serve.vllm import merged_for_vllm, vllm_generator

        tokenizer = load_chat_tokenizer(*run_model(cfg.model, args.adapter), cfg.stage, cfg.data.template)
        folder = merged_for_vllm(args.adapter) if args.adapter else Path(resolve_model(cfg.model.name_or_path))
        results = predict(None, tokenizer, cfg, out, generator=vllm_generator(folder, tokenizer, cfg.generate,
                                                                                args.vllm_args))
    else:
        model, tokenizer = load_for_chat(*run_model(cfg.model, args.adapter), cfg.stage, cfg.data.template)
        results = predict(model, tokenizer, cfg, out)
    print(json.dumps(results, indent=2, ensure_ascii=False))
    logger.info("eval results written to %s", out)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from peftkit.config.schema import GenerateArgs
    from peftkit.data.formats import Message
    from peftkit.infer.chat import chat_images, chat_loop, load_for_chat, reply

    gen = GenerateArgs(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                       temperature=args.temperature or 1.0)
    spec = model_spec(args)
    model, tokenizer = load_for_chat(*spec)
    images = chat_images(spec[0], args.image)
    if args.prompt is None:
        chat_loop(model, tokenizer, gen, args.system, images=images)
        return 0
    messages: list[Message] = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    print(reply(model, tokenizer, messages, gen, stream=None, images=images))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """One target of export's table (export/__init__.py: TARGETS), then --push-to-hub."""
    from peftkit.export import TARGETS, export
    from peftkit.export.hub import push_to_hub

    fmt = "merged" if args.format == "hf" else args.format  # hf: the name this format had first
    options = {k: getattr(args, k) for k in TARGETS[fmt].options}
    report = export(args.adapter, args.out, fmt, overwrite=args.overwrite, **options)
    print(TARGETS[fmt].landed(report, options))
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(Path(args.out), args.push_to_hub, args.private)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from peftkit.serve import ServeOptions, serve

    if args.print_vllm:
        from peftkit.serve import named_adapters
        from peftkit.serve.vllm import vllm_hand_off

        for name, run in (named_adapters(args.adapter) if args.adapter else {None: args.model or ""}).items():
            if not run:
                raise PeftkitError("--print-vllm needs --adapter RUN (or --model FOLDER)")
            command, blocks = vllm_hand_off(run, name)
            print(command)
            for line in blocks:
                print(f"  ! {line}")
        return 0
    api_key = args.api_key or os.environ.get("PEFTKIT_API_KEY")
    if serve_engine(args) == "vllm":
        return _exec_vllm(args, api_key)
    loopback = is_loopback(args.host)
    if not loopback and not api_key:
        logger.warning("serving on %s without --api-key: anyone who reaches this address can use the model", args.host)
    model, adapters, stage, template = model_spec(args)
    serve((model, adapters or [], stage, template), ServeOptions(
        args.host, args.port, api_key, args.max_tokens_limit, args.served_model_name, slots=args.slots,
        max_queue=args.max_queue, request_timeout=args.request_timeout, max_model_len=args.max_model_len,
        dtype=serve_dtype(args.dtype), image_root=args.image_root))
    return 0


def _exec_vllm(args: argparse.Namespace, api_key: str | None) -> int:
    """`peftkit serve --engine vllm`: the checked `vllm serve` command replaces this process."""
    from peftkit.serve import named_adapters
    from peftkit.serve.vllm import exec_vllm, serve_command

    runs = named_adapters(args.adapter) if args.adapter else {args.served_model_name or "model": args.model or ""}
    if not all(runs.values()):
        raise PeftkitError("--engine vllm needs --adapter RUN (or --model FOLDER)")
    if args.served_model_name and len(runs) == 1:
        runs = {args.served_model_name: next(iter(runs.values()))}
    extra = shlex.split(args.vllm_args or "") + (["--max-model-len", str(args.max_model_len)] if args.max_model_len else [])
    exec_vllm(serve_command(runs, args.host, args.port, api_key, extra))
    return 0  # not reached


def cmd_board(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from peftkit.board import board

    token = args.token or os.environ.get("PEFTKIT_BOARD_TOKEN")
    board(Path(args.runs_dir), args.host, args.port, token, is_loopback(args.host))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from peftkit.train.plot import plot_loss

    path = plot_loss(args.output_dir)
    if path is None:
        raise PeftkitError(f"{args.output_dir}: trainer_log.jsonl has no loss yet (is it a peftkit output_dir?)")
    print(path)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from peftkit.model import resolve_model

    print(resolve_model(args.name))
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    import peft
    import torch
    import transformers

    print(f"peftkit {__version__} (torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__})")
    return 0
