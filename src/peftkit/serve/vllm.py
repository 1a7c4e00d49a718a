"""Handing a run to vLLM: the `vllm serve` command for a LoRA run (or a merged export), and what in the
adapter vLLM's LoRA loader refuses or must be told, from its PEFTHelper checks (vllm/lora/peft_helper.py:
rank above --max-lora-rank, bias without --enable-lora-bias, DoRA, modules_to_save). vLLM needs a GPU
and is not installed here: the command is checked against those rules, not run."""

from __future__ import annotations

import shlex
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.rundir import adapter_config

VLLM_DEFAULT_MAX_LORA_RANK = 16


def _template_flags(run: Path) -> list[str]:
    """The run's chat template (what it trained with) and, when it writes tool calls or reasoning, vLLM's
    parsers for that format: hermes for <tool_call> blocks, llama3_json for Llama 3.1's JSON calls,
    deepseek_r1 for <think>...</think>."""
    template_file = run / "chat_template.jinja"
    if not template_file.is_file():
        return []
    template = template_file.read_text(encoding="utf-8")
    flags = ["--chat-template", str(template_file)]
    if "<tool_call>" in template:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    elif "ipython" in template and "tools" in template:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    if "<think>" in template:
        flags += ["--reasoning-parser", "deepseek_r1"]
    return flags


def vllm_hand_off(run: str | Path, name: str | None = None) -> tuple[str, list[str]]:
    """(the `vllm serve` command line, what blocks the adapter in vLLM: empty when nothing does)."""
    argv, blocks = _serve_argv(Path(run), name)
    return shlex.join(argv), blocks


def _serve_argv(run: Path, name: str | None) -> tuple[list[str], list[str]]:
    """`vllm serve` arguments for one run (["vllm", "serve", MODEL, flags...]) and what blocks it."""
    config = adapter_config(run)
    if config is None:
        if not (run / "config.json").is_file():
            raise PeftkitError(f"{run}: neither a LoRA run (adapter_config.json) nor a model folder (config.json)")
        return ["vllm", "serve", str(run)], []  # a merged export or a full / freeze run: a plain model
    name = name or run.name
    base = config.get("base_model_name_or_path") or "BASE_MODEL"
    flags = ["--enable-lora", "--lora-modules", f"{name}={run}"]
    rank = max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
    if rank > VLLM_DEFAULT_MAX_LORA_RANK:
        flags += ["--max-lora-rank", str(rank)]
    if config.get("bias", "none") != "none":
        flags.append("--enable-lora-bias")
    flags += _template_flags(run)
    blocks = []
    if config.get("peft_type", "LORA") != "LORA":
        blocks.append(f"peft_type {config['peft_type']}: vLLM loads LoRA adapters only")
    if config.get("use_dora"):
        blocks.append("use_dora: vLLM does not support DoRA adapters")
    if config.get("modules_to_save"):
        blocks.append(f"modules_to_save {config['modules_to_save']}: vLLM's LoRA loader refuses fully trained modules")
    if blocks:
        blocks.append(f"serve a merged export instead: peftkit export --adapter {run} --out MERGED, then vllm serve MERGED")
    return ["vllm", "serve", str(base), *flags], blocks


def vllm_argv(runs: dict[str, str], host: str, port: int, api_key: str | None) -> list[str]:
    """`vllm serve` arguments for one model folder, or for LoRA runs of one base served side by side under their
    names (`peftkit serve --engine vllm`); PeftkitError when vLLM would refuse an adapter or the bases differ."""
    commands = {name: _serve_argv(Path(run), name) for name, run in runs.items()}
    blocked = [f"{name}: {line}" for name, (_, blocks) in commands.items() for line in blocks]
    if blocked:
        raise PeftkitError("--engine vllm: vLLM cannot serve this as it is:\n  " + "\n  ".join(blocked))
    argvs = [argv for argv, _ in commands.values()]  # ["vllm", "serve", MODEL, ...]: execvp's argv as it is
    bases = {argv[2] for argv in argvs}
    if len(bases) > 1:
        raise PeftkitError(f"--engine vllm: the adapters are of different base models ({', '.join(sorted(bases))}); "
                           "one vLLM server serves adapters of one base")
    argv = argvs[0]
    if "--lora-modules" in argv:  # one --lora-modules naming every adapter; the largest rank
        at = argv.index("--lora-modules") + 1
        argv[at:at + 1] = [a[a.index("--lora-modules") + 1] for a in argvs]
        ranks = [int(a[a.index("--max-lora-rank") + 1]) for a in argvs if "--max-lora-rank" in a]
        if "--max-lora-rank" in argv:
            argv[argv.index("--max-lora-rank") + 1] = str(max(ranks))
        elif ranks:
            argv += ["--max-lora-rank", str(max(ranks))]
    argv += ["--host", host, "--port", str(port)]
    return argv + (["--api-key", api_key] if api_key else [])
