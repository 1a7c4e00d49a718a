"""The `peftkit` command: parse arguments, call one function, turn user errors into exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from peftkit import __version__
from peftkit.constants import EMBEDDED_MODEL
from peftkit.errors import PeftkitError
from peftkit.hosts import is_loopback

logger = logging.getLogger("peftkit")


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from peftkit.config import load_config
    from peftkit.train.run import train

    if (args.nproc > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        return _torchrun(args)
    cfg = load_config(args.config, args.overrides)  # every process checks it: errors show before any launch
    summary = train(cfg, resume_command=resume_command(args)).summary
    if os.environ.get("RANK", "0") == "0":
        _print_summary(summary)
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The shell command that resumes this run: the same config and overrides (quoted), resume set."""
    import shlex

    keep = [o for o in args.overrides if o.partition("=")[0] not in ("train.resume_from_checkpoint",
                                                                       "train.overwrite_output_dir")]
    words = ["peftkit", "train", *_launch_flags(args), args.config, *keep, "train.resume_from_checkpoint=true"]
    return " ".join(shlex.quote(w) for w in words)


_LAUNCH_ENV = "PEFTKIT_LAUNCH_FLAGS"  # the launch flags, passed to the processes torchrun starts


def _launch_flags(args: argparse.Namespace) -> list[str]:
    """peftkit train's own launch flags, as given (for the resume command); in a process torchrun started
    for them, as its launcher passed them on."""
    import os

    if "LOCAL_RANK" in os.environ and os.environ.get(_LAUNCH_ENV):
        return os.environ[_LAUNCH_ENV].split()
    return ([f"--nproc={args.nproc}"] if args.nproc > 1 else []) + (_node_flags(args) if args.nnodes > 1 else [])


def _node_flags(args: argparse.Namespace) -> list[str]:
    """--nnodes / --node-rank / --master-addr / --master-port: spelled alike by peftkit train and torchrun."""
    return [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}",
            f"--master-port={args.master_port}"]


def _torchrun(args: argparse.Namespace) -> int:
    """`--nproc N` (and `--nnodes`): hand over to torchrun (never a launcher of peftkit's own); it forwards
    signals. One node: --standalone. Several: a static rendezvous at --master-addr:--master-port, the
    command run on every node with its own --node-rank (what `torchrun --nnodes` documents)."""
    import os

    from peftkit.config import load_config

    if args.nnodes > 1 and (not args.master_addr or not 0 <= args.node_rank < args.nnodes):
        raise PeftkitError(f"--nnodes {args.nnodes} needs --master-addr (the address of node 0, reachable from every "
                           f"node) and --node-rank from 0 to {args.nnodes - 1} (this node's; got {args.node_rank})")
    load_config(args.config, args.overrides)  # fail here, once, rather than in N processes
    nodes = ["--standalone"] if args.nnodes == 1 else _node_flags(args)
    command = [sys.executable, "-m", "torch.distributed.run", *nodes, f"--nproc_per_node={args.nproc}",
               "-m", "peftkit", "train", args.config, *args.overrides]
    os.environ[_LAUNCH_ENV] = " ".join(_launch_flags(args))  # for the workers' resume hint
    logger.info("running: %s", " ".join(command[1:]))
    os.execv(sys.executable, command)
    return 0  # not reached


# The figures each stage is judged by (sft, pt, rm, dpo, cls).
_SHOWN_METRICS = ("precision", "recall", "f1", "exact_match", "invalid_json", "perplexity", "accuracy", "margin",
                  "rewards/accuracies", "rewards/margins", "majority_accuracy")


def _print_summary(summary: dict) -> None:
    lines = [f"training loss: {summary['train_loss']:.4f} ({summary['train_seconds']} s of training)"]
    for when in ("before", "after"):
        m = summary.get(f"metrics_{when}")
        if m:
            shown = {k: v for k, v in m.items() if k in _SHOWN_METRICS}
            lines.append(f"{when:>6} training: " + ", ".join(f"{k} {v}" for k, v in shown.items())
                         + (f" on {m['records']} records" if "records" in m else "")
                         + (f" ({m['predict_seconds']} s)" if "predict_seconds" in m else ""))
            if when == "after" and m.get("per_type"):
                lines.append("        F1 per type: " + ", ".join(f"{k} {v['f1']}" for k, v in m["per_type"].items()))
    lines.append(f"wall time: {summary['wall_seconds']} s")
    lines.append(f"outputs: {summary['output_dir']}")
    print("\n".join(lines))


def _cmd_data(args: argparse.Namespace) -> int:
    from peftkit.config import load_config
    from peftkit.data import apply_template, describe_example, prepare_data
    from peftkit.data.packing import unpack_row
    from peftkit.model import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model)  # the tokenizer only: no weights are loaded
    apply_template(tokenizer, cfg.data.template, cfg.stage)
    data = prepare_data(cfg.data, tokenizer, cfg.stage)
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


def _cmd_eval(args: argparse.Namespace) -> int:
    from peftkit.config import load_config
    from peftkit.eval.predict import predict
    from peftkit.infer.chat import load_for_chat

    cfg = load_config(args.config, args.overrides)
    if not cfg.eval.dataset:
        raise PeftkitError("eval.dataset: missing — name the records to predict on, e.g. eval.dataset=data/dev.json")
    # Its own folder per dataset: never over the figures the run itself reported.
    out = Path(args.out) if args.out else Path(args.adapter or cfg.train["output_dir"]) / "eval" / Path(cfg.eval.dataset).stem
    if _eval_engine(args, cfg) == "vllm":
        from peftkit.infer.chat import load_chat_tokenizer
        from peftkit.model.resolve import resolve_model
        from peftkit.serve.vllm import merged_for_vllm, vllm_generator

        tokenizer = load_chat_tokenizer(cfg.model, args.adapter, cfg.stage, cfg.data.template)
        folder = merged_for_vllm(args.adapter) if args.adapter else Path(resolve_model(cfg.model.name_or_path))
        results = predict(None, tokenizer, cfg, out, generator=vllm_generator(folder, tokenizer, cfg.generate,
                                                                                args.vllm_args))
    else:
        model, tokenizer = load_for_chat(cfg.model, args.adapter, cfg.stage, cfg.data.template)
        results = predict(model, tokenizer, cfg, out)
    print(json.dumps(results, indent=2, ensure_ascii=False))
    logger.info("eval results written to %s", out)
    return 0


def _eval_engine(args: argparse.Namespace, cfg: Any) -> str:
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


def _cmd_chat(args: argparse.Namespace) -> int:
    from peftkit.config.schema import GenerateArgs
    from peftkit.data.formats import Message
    from peftkit.infer.chat import chat_loop, load_for_chat, reply

    gen = GenerateArgs(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                       temperature=args.temperature or 1.0)
    model, tokenizer = load_for_chat(*_model_spec(args))
    if args.prompt is None:
        chat_loop(model, tokenizer, gen, args.system)
        return 0
    messages: list[Message] = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    print(reply(model, tokenizer, messages, gen, stream=None))
    return 0


def _model_spec(args: argparse.Namespace) -> tuple[Any, Any, str, str | None]:
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
    model = replace(cfg.model, name_or_path=args.model) if args.model else cfg.model
    return model, args.adapter, cfg.stage, cfg.data.template


def _run_spec(adapter: str | list[str]) -> tuple[Any, Any, str, str | None]:
    """_model_spec for `--adapter RUN` alone: the (first) run's base model as it trained, its stage and template; a
    freeze / full run is itself the model."""
    from dataclasses import replace

    from peftkit.rundir import read_run
    from peftkit.serve import named_adapters

    first = next(iter(named_adapters(adapter if isinstance(adapter, list) else [adapter]).values()))
    run = read_run(first)
    if run.is_adapter:
        return replace(run.model, name_or_path=run.base_model), adapter, run.stage, run.template
    whole = replace(run.model, name_or_path=str(run.path), quantization_bit=None)
    return whole, [] if isinstance(adapter, list) else None, run.stage, run.template


def _cmd_export(args: argparse.Namespace) -> int:
    from peftkit.export import export
    from peftkit.export.hub import push_to_hub
    from peftkit.export.merge import export_gguf, export_gguf_lora

    if args.format == "gguf-lora":
        report = export_gguf_lora(args.adapter, args.out, overwrite=args.overwrite)
        print(f"exported the adapter to {report.out}: (alpha/r)·B·A equals peft's delta weights within "
              f"{report.max_logit_diff:.2g}; llama.cpp: `llama-cli -m BASE.gguf --lora {report.out}`")
    elif args.format == "gguf":
        report = export_gguf(args.adapter, args.out, quant=args.quant, overwrite=args.overwrite)
        print(f"exported to {report.out}: max logit difference {report.max_logit_diff:.3g} ({args.quant}), "
              f"{report.records_checked} training records re-rendered identically; Ollama: "
              f"`ollama create NAME -f {Path(args.out) / 'Modelfile'}`")
    else:
        report = export(args.adapter, args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        print(f"exported to {report.out}: max logit difference {report.max_logit_diff:.2e}, "
              f"{report.records_checked} training records re-rendered identically")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(Path(args.out), args.push_to_hub, args.private)}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from peftkit.serve import serve

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
    if _serve_engine(args) == "vllm":
        return _exec_vllm(args, api_key)
    loopback = is_loopback(args.host)
    if not loopback and not api_key:
        logger.warning("serving on %s without --api-key: anyone who reaches this address can use the model", args.host)
    model, adapters, stage, template = _model_spec(args)
    serve((model, adapters or [], stage, template), args.host, args.port, api_key, args.max_tokens_limit,
          args.served_model_name, slots=args.slots, max_queue=args.max_queue, request_timeout=args.request_timeout,
          max_model_len=args.max_model_len, dtype=_serve_dtype(args.dtype))
    return 0


def _serve_dtype(choice: str) -> str | None:
    """--dtype for peftkit's engine: None keeps the weights' float32. On a native-bf16 CPU, bf16 weights served the
    demo adapter at 1.45 requests/s against float32's 1.0 (64 clients, 64 rows; benchmarks/RESULTS.md)."""
    if choice == "auto":
        from peftkit.config.load import bf16_is_fast

        choice = "bfloat16" if bf16_is_fast() else "float32"
    return None if choice == "float32" else choice


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


def _serve_engine(args: argparse.Namespace) -> str:
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


def _cmd_board(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from peftkit.board import board

    token = args.token or os.environ.get("PEFTKIT_BOARD_TOKEN")
    board(Path(args.runs_dir), args.host, args.port, token, is_loopback(args.host))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from peftkit.train.plot import plot_loss

    path = plot_loss(args.output_dir)
    if path is None:
        raise PeftkitError(f"{args.output_dir}: trainer_log.jsonl has no loss yet (is it a peftkit output_dir?)")
    print(path)
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from peftkit.model import resolve_model

    print(resolve_model(args.name))
    return 0


def _cmd_version(args: argparse.Namespace) -> int:
    import peft
    import torch
    import transformers

    print(f"peftkit {__version__} (torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__})")
    return 0


def _add_model_options(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument("--model", help=f"model name or folder, a merged export too (default: the config's, else {EMBEDDED_MODEL})")
    if several:
        p.add_argument("--adapter", action="append", metavar="[NAME=]RUN",
                       help="a trained output_dir (LoRA adapter); repeat as NAME=RUN to serve several on one base, "
                            "the request's model picking one")
    else:
        p.add_argument("--adapter", help="a trained output_dir (LoRA adapter)")
    p.add_argument("--config", help="a training YAML: its model.dtype, attn_implementation, trust_remote_code, "
                   "data.template and stage are used")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to --config")


def _add_engine_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--engine", choices=("peftkit", "vllm", "auto"), default="peftkit",
                   help=f"what to {what}: peftkit's engine (default); vllm (vLLM's own venv: `make vllm`, or "
                        "$PEFTKIT_VLLM; a single LoRA run is merged into a cached export first); auto: vllm where it "
                        "is installed and takes the model, otherwise peftkit, the choice printed")
    p.add_argument("--vllm-args", metavar="FLAGS", help="more vLLM engine flags, e.g. '--enforce-eager' "
                   "(vllm serve's own; for eval, passed to vllm.LLM with dashes as underscores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Fine-tune language models with LoRA, freeze or full tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune as a YAML config says")
    p.add_argument("config", help="YAML config (see examples/)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=2")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) on this machine: runs torchrun --standalone --nproc_per_node N")
    p.add_argument("--nnodes", type=int, default=1,
                   help="machines taking part; run the same command on each with its --node-rank (torchrun --nnodes)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0 to nnodes - 1")
    p.add_argument("--master-addr", default=None, help="address of node 0, reachable from every node")
    p.add_argument("--master-port", type=int, default=29500, help="a free port on node 0 (default 29500)")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("data", help="show what the data engine makes of a config's data, without loading the model")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("-n", type=int, default=1, help="decoded examples to show (default 1)")
    p.set_defaults(func=_cmd_data)
    p = sub.add_parser("eval", aliases=["predict"], help="score eval.dataset with eval.metrics (generating where needed)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--adapter", help="a trained output_dir (LoRA adapter) to load on the base model")
    p.add_argument("--out", help="folder for the predictions and results (default: ADAPTER_OR_OUTPUT_DIR/eval/DATASET)")
    _add_engine_options(p, "generate the answers with")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("chat", help="talk to a model")
    _add_model_options(p)
    p.add_argument("--prompt", help="answer this one prompt and exit; without it, an interactive loop")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.set_defaults(func=_cmd_chat)
    p = sub.add_parser("export", help="merge a LoRA run (or copy a freeze/full run) into a standalone folder")
    p.add_argument("--adapter", required=True, help="the run's output_dir")
    p.add_argument("--out", required=True, help="the folder to write: new, empty, or a previous export (replaced whole)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it holds other files")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size, e.g. 500MB")
    p.add_argument("--format", choices=("hf", "gguf", "gguf-lora"), default="hf",
                   help="hf: a transformers folder (default); gguf: one GGUF file for llama.cpp / Ollama + a Modelfile; "
                        "gguf-lora: the LoRA adapter alone, for llama.cpp's --lora on the base model's GGUF")
    p.add_argument("--quant", choices=("f16", "bf16", "q8_0"), default="q8_0", help="GGUF weight type (default q8_0)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="after the checks pass, upload the export as this hub model repo")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("serve", help="serve an OpenAI-compatible API (/v1/chat/completions)")
    _add_model_options(p, several=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (or set PEFTKIT_API_KEY)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--served-model-name", help="the model id clients send (default: the folder name)")
    p.add_argument("--slots", type=int, default=16, help="requests generated at once (rows of the running batch)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row; more get 429")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="peftkit's engine: the weights stored in bf16 or float32; auto (default): bf16 where the CPU "
                        "or GPU computes it natively (as train.bf16: auto), else float32 (exact; bf16 answers may "
                        "differ from float32's)")
    p.add_argument("--max-model-len", type=int, help="tokens per request, prompt and answer (default: the model's "
                   "context, shortened to what the KV cache budget holds: $PEFTKIT_KV_CACHE_GIB, else 60%% of free memory)")
    p.add_argument("--request-timeout", type=float, default=600,
                   help="seconds a request may take, waiting included; then it ends with what it has (finish_reason length)")
    _add_engine_options(p, "serve with")
    p.add_argument("--print-vllm", action="store_true",
                   help="print the `vllm serve` command for --adapter (or --model) and what vLLM would refuse, then exit")
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("board", help="watch, compare, start, stop and resume runs in the browser")
    p.add_argument("runs_dir", nargs="?", default="outputs", help="the folder holding runs' output_dirs (default outputs)")
    p.add_argument("--host", default="127.0.0.1", help="another address than loopback needs --token")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", help="require this token on every request (or set PEFTKIT_BOARD_TOKEN)")
    p.set_defaults(func=_cmd_board)
    p = sub.add_parser("plot", help="redraw training_loss.png from trainer_log.jsonl (during or after a run)")
    p.add_argument("output_dir")
    p.set_defaults(func=_cmd_plot)
    p = sub.add_parser("model", help="resolve a model name to its local folder (converting the embedded model once)")
    p.add_argument("name", nargs="?", default=EMBEDDED_MODEL)
    p.set_defaults(func=_cmd_model)
    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=_cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peftkit` console script and `python -m peftkit`."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # Overrides may come anywhere on the line (`peftkit eval CONF --adapter RUN key=value`): argparse leaves
    # those after an option unparsed, so they are taken here; anything else unknown is still an error.
    takes_overrides = hasattr(args, "overrides")
    stray = [u for u in unknown if not (takes_overrides and "=" in u and not u.startswith("-"))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    logging.basicConfig(level=logging.INFO, format="[peftkit] %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except PeftkitError as e:
        print(f"peftkit: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("peftkit: interrupted", file=sys.stderr)
        return 130
