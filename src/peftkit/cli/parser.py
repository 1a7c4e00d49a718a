"""The `peftkit` command line as argparse declares it: each subcommand's options and the function it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from peftkit.cli.commands import (
    cmd_board,
    cmd_chat,
    cmd_data,
    cmd_eval,
    cmd_export,
    cmd_model,
    cmd_plot,
    cmd_serve,
    cmd_version,
)
from peftkit.cli.train import cmd_train
from peftkit.constants import EMBEDDED_MODEL


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
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("data", help="show what the data engine makes of a config's data, without loading the model")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("-n", type=int, default=1, help="decoded examples to show (default 1)")
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("eval", aliases=["predict"], help="score eval.dataset with eval.metrics (generating where needed)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--adapter", help="a trained output_dir (LoRA adapter) to load on the base model")
    p.add_argument("--out", help="folder for the predictions and results (default: ADAPTER_OR_OUTPUT_DIR/eval/DATASET)")
    _add_engine_options(p, "generate the answers with")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("chat", help="talk to a model")
    _add_model_options(p)
    p.add_argument("--prompt", help="answer this one prompt and exit; without it, an interactive loop")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image-text models: an image shown with the (first) prompt; repeat for several")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("export", help="merge a LoRA run (or copy a freeze/full run) into a standalone folder")
    p.add_argument("--adapter", required=True, help="the run's output_dir")
    p.add_argument("--out", required=True, help="the folder to write: new, empty, or a previous export (replaced whole)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it holds other files")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size, e.g. 500MB")
    p.add_argument("--format", choices=("merged", "hf", "gguf", "gguf-lora"), default="merged",
                   help="merged: a transformers folder (default; hf is the same); gguf: one GGUF file for llama.cpp / "
                        "Ollama + a Modelfile; gguf-lora: the LoRA adapter alone, for llama.cpp's --lora on the base "
                        "model's GGUF")
    p.add_argument("--quant", choices=("f16", "bf16", "q8_0"), default="q8_0", help="GGUF weight type (default q8_0)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="after the checks pass, upload the export as this hub model repo")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    p.set_defaults(func=cmd_export)
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
    p.add_argument("--image-root", type=Path, help="image-text models: local image paths in requests are read "
                   "only under this folder (default: none, images come as data: URLs)")
    p.add_argument("--request-timeout", type=float, default=600,
                   help="seconds a request may take, waiting included; then it ends with what it has (finish_reason length)")
    _add_engine_options(p, "serve with")
    p.add_argument("--print-vllm", action="store_true",
                   help="print the `vllm serve` command for --adapter (or --model) and what vLLM would refuse, then exit")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("board", help="watch, compare, start, stop and resume runs in the browser")
    p.add_argument("runs_dir", nargs="?", default="outputs", help="the folder holding runs' output_dirs (default outputs)")
    p.add_argument("--host", default="127.0.0.1", help="another address than loopback needs --token")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", help="require this token on every request (or set PEFTKIT_BOARD_TOKEN)")
    p.set_defaults(func=cmd_board)
    p = sub.add_parser("plot", help="redraw training_loss.png from trainer_log.jsonl (during or after a run)")
    p.add_argument("output_dir")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("model", help="resolve a model name to its local folder (converting the embedded model once)")
    p.add_argument("name", nargs="?", default=EMBEDDED_MODEL)
    p.set_defaults(func=cmd_model)
    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=cmd_version)
    return parser
