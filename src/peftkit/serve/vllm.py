"""Handing a run to vLLM, on a GPU or on the CPU (vLLM's CPU build, `make vllm`): where vLLM is, the
environment it runs in, the `vllm serve` command for runs (one LoRA run merged into a cached export; several
as LoRA modules of one base), offline generation for `peftkit eval --engine vllm`, and what vLLM refuses, checked
before it starts: its LoRA loader's PEFTHelper rules (vllm/lora/peft_helper.py: rank above --max-lora-rank,
bias without --enable-lora-bias, DoRA, modules_to_save) and its CPU attention's head sizes."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.rundir import adapter_config

VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_ENV = "PEFTKIT_VLLM"  # the vllm executable (or the venv holding it) to use
VLLM_CACHE_ENV = "PEFTKIT_VLLM_CACHE"  # where merged runs for vLLM are kept (default PEFTKIT_HOME/vllm)
VLLM_VENV = ".venv-vllm"  # what `make vllm` builds, beside peftkit's own .venv
# vLLM 0.32's CPU attention kernels (csrc/cpu): other head sizes start, then fail on the first request with
# "Unsupported CPU attention configuration: head_dim=16".
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_KV_CACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE unless set: vLLM's own default reserves a share of all memory


def find_vllm() -> Path | None:
    """The vllm executable: $PEFTKIT_VLLM, else `make vllm`'s .venv-vllm beside this Python's venv, else PATH."""
    explicit = os.environ.get(VLLM_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        path = path / "bin" / "vllm" if path.is_dir() else path
        if not path.is_file():
            raise PeftkitError(f"${VLLM_ENV}={explicit}: no vllm executable there (`make vllm` builds one in {VLLM_VENV})")
        return path
    beside = Path(sys.prefix).parent / VLLM_VENV / "bin" / "vllm"
    if beside.is_file():
        return beside
    found = shutil.which("vllm")
    return Path(found) if found else None


NOT_INSTALLED = (f"vLLM is not installed: `make vllm` builds it in {VLLM_VENV} (without a CUDA device, vLLM's CPU "
                 f"build), or set ${VLLM_ENV} to a vllm executable")


def require_vllm() -> Path:
    """find_vllm's executable, or PeftkitError saying how to install it."""
    executable = find_vllm()
    if executable is None:
        raise PeftkitError(f"--engine vllm: {NOT_INSTALLED}")
    return executable


def cpu_build(executable: Path) -> bool:
    """Whether the vLLM beside `executable` is its CPU build (the vllm-cpu distribution)."""
    return any(executable.resolve().parent.parent.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))


def cpu_vllm() -> bool:
    """Whether the vLLM found is its CPU build (so its CPU settings, dtype and head sizes apply)."""
    executable = find_vllm()
    return executable is not None and cpu_build(executable)


def vllm_env() -> dict[str, str]:
    """This environment plus, for vLLM's CPU build, what it needs: the device (its platform detection does not always find
    it), a KV-cache size, and its engine's connection on loopback (else the machine's network address)."""
    env = dict(os.environ)
    if cpu_vllm():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    return env


def vllm_dtype() -> str:
    """bf16 where the hardware computes it (vLLM's `auto` would take bf16 for a float32 checkpoint even where it
    is emulated); float32 otherwise."""
    from peftkit.config.load import bf16_is_fast

    return "bfloat16" if bf16_is_fast() else "float32"


def model_refusal(model_dir: str | Path) -> str | None:
    """Why vLLM here cannot run the model in `model_dir` (its config.json; a LoRA run's base), or None."""
    adapter = adapter_config(Path(model_dir))
    if adapter is not None:  # a LoRA run: its base model's shapes
        from peftkit.model.resolve import resolve_model

        model_dir = resolve_model(str(adapter.get("base_model_name_or_path") or ""))
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file() or not cpu_vllm():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config = config.get("text_config") or config
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or (config.get("hidden_size") or 0) // heads
    if head_dim not in CPU_HEAD_SIZES:
        return (f"{model_dir}: head size {head_dim}, which vLLM's CPU attention does not compute (it takes "
                f"{', '.join(map(str, CPU_HEAD_SIZES))}); use peftkit's engine (--engine peftkit)")
    return None


def merged_for_vllm(run: str | Path) -> Path:
    """A LoRA run merged (peftkit export, verified) into $PEFTKIT_VLLM_CACHE (default PEFTKIT_HOME/vllm)/RUN/DIGEST,
    the digest taken over the adapter's files: exported once, reused while the run is unchanged. A freeze / full
    run is itself a model."""
    from peftkit.export import export
    from peftkit.export.checks import EXPORT_MARKER
    from peftkit.model.resolve import peftkit_home

    run = Path(run).resolve()
    if adapter_config(run) is None:
        return run
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "chat_template.jinja"):
        file = run / name
        if file.is_file():
            stat = file.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    # one folder per run (its name and path), one export in it per state of the run's files
    home = Path(os.environ.get(VLLM_CACHE_ENV) or peftkit_home() / "vllm")
    cache = home / f"{run.name}-{hashlib.sha256(str(run).encode()).hexdigest()[:8]}"
    out = cache / digest.hexdigest()[:12]
    if not (out / EXPORT_MARKER).is_file():
        export(run, out, overwrite=True)
        for stale in cache.iterdir():  # this run's exports from before it changed: a best-effort cleanup
            if stale != out and (stale / EXPORT_MARKER).is_file():
                shutil.rmtree(stale, ignore_errors=True)
    return out


def _template_flags(run: Path) -> list[str]:
    """The run's chat template (what it trained with) and, when it writes tool calls or reasoning, vLLM's
    parsers for that format: hermes for <tool_call> blocks, llama3_json for Llama 3.1's JSON calls,
    deepseek_r1 for <think>...</think>."""
    template_file = run / "chat_template.jinja"
    if not template_file.is_file():
        return []
    template = template_file.read_text(encoding="utf-8")
    flags = ["--chat-template", str(template_file)]
    if "<tool_call>" in template:  # vLLM 0.32's hermes parser reads the text: no tokens needed
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    elif "ipython" in template and "tools" in template:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    if "<think>" in template and {"<think>", "</think>"} <= _vocabulary(run):
        flags += ["--reasoning-parser", "deepseek_r1"]  # it finds the reasoning by those tokens' ids, or will not start
    return flags


def _vocabulary(folder: Path) -> set[str]:
    """The token strings of the tokenizer.json in `folder` (its vocabulary and added tokens)."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return set()
    vocab = (data.get("model") or {}).get("vocab") or {}
    return set(vocab if isinstance(vocab, dict) else ()) | {t.get("content") for t in data.get("added_tokens") or []}


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


def adapter_blocks(run: str | Path) -> list[str]:
    """What in a LoRA run vLLM's LoRA loader refuses (empty: nothing, or not a LoRA run)."""
    return _serve_argv(Path(run), None)[1] if adapter_config(Path(run)) else []


def serve_command(runs: dict[str, str], host: str, port: int, api_key: str | None,
                  extra: list[str] | None = None) -> list[str]:
    """`peftkit serve --engine vllm`: the `vllm serve` arguments for `runs` (served name → run or model folder).
    One LoRA run is served merged (merged_for_vllm) under its name: vLLM's unmerged LoRA path measured 4× slower
    on the CPU (issue 37); several are LoRA modules of their one base. PeftkitError for what vLLM would refuse."""
    single = len(runs) == 1
    if single:  # a model folder then: served under the name, with its template and the parsers it needs
        (name, run), = runs.items()
        runs = {name: str(merged_for_vllm(run))}
    argv = vllm_argv(runs, host, port, api_key)
    refusal = model_refusal(argv[2])
    if refusal:
        raise PeftkitError(f"--engine vllm: {refusal}")
    if single:
        argv[3:3] = _template_flags(Path(argv[2]))
        argv += ["--served-model-name", name]
    extra = list(extra or [])
    if cpu_vllm() and not any(flag == "--dtype" or flag.startswith("--dtype=") for flag in extra):
        argv += ["--dtype", vllm_dtype()]
    return argv + extra


def exec_vllm(argv: list[str]) -> None:
    """Replace this process with `vllm serve` (argv[0] "vllm": the executable find_vllm finds)."""
    executable = find_vllm()
    if executable is None:
        raise PeftkitError(f"--engine vllm: {NOT_INSTALLED}. The command would be: {shlex.join(argv)}")
    print(shlex.join([str(executable), *argv[1:]]), flush=True)
    os.execve(str(executable), [str(executable), *argv[1:]], vllm_env())


def generate_offline(model_dir: str | Path, prompts: list[list[int]], sampling: dict[str, Any],
                     stop_token_ids: list[int], extra: dict[str, Any] | None = None) -> list[list[int]]:
    """Answers (token ids) to token-id `prompts` from vLLM's offline engine, in its own Python (vllm_worker.py
    runs there: peftkit is not installed in vLLM's venv). `sampling`: temperature (0 = greedy), top_p, top_k,
    repetition_penalty, max_tokens, seed. The caller has asked model_refusal (vllm_unusable) before any work."""
    executable = require_vllm()
    python = executable.parent / "python"
    if not python.is_file():
        raise PeftkitError(f"--engine vllm: no python beside {executable} to run vLLM's offline engine with")
    longest = max((len(p) for p in prompts), default=1)
    request = {"model": str(model_dir), "prompts": prompts, "sampling": sampling, "stop_token_ids": stop_token_ids,
               "engine": {"dtype": vllm_dtype() if cpu_vllm() else "auto",
                          "max_model_len": longest + int(sampling["max_tokens"]), **(extra or {})}}
    worker = Path(__file__).resolve().parents[1] / "infer" / "vllm_worker.py"
    with tempfile.TemporaryDirectory(prefix="peftkit-vllm-") as tmp:
        (Path(tmp) / "request.json").write_text(json.dumps(request), encoding="utf-8")
        done = subprocess.run([str(python), str(worker), str(Path(tmp) / "request.json"), str(Path(tmp) / "answers.jsonl")],
                              env=vllm_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        answers = Path(tmp) / "answers.jsonl"
        if done.returncode != 0 or not answers.is_file():
            tail = "\n".join(done.stdout.splitlines()[-15:])
            raise PeftkitError(f"--engine vllm: vLLM's offline engine failed (exit {done.returncode}):\n{tail}")
        rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines() if line]
    return [row["tokens"] for row in sorted(rows, key=lambda r: r["index"])]


def engine_args(flags: str | None) -> dict[str, Any]:
    """`--vllm-args "--enforce-eager --max-num-seqs 64"` as vLLM's offline LLM(...) keywords (its CLI's
    convention: dashes to underscores, a flag alone is true, numbers parsed)."""
    words, kwargs = shlex.split(flags or ""), {}
    while words:
        word = words.pop(0)
        if not word.startswith("--"):
            raise PeftkitError(f"--vllm-args: {word!r} is not a --flag (e.g. --vllm-args '--enforce-eager')")
        key, _, value = word[2:].partition("=")
        if not value and words and not words[0].startswith("--"):
            value = words.pop(0)
        kwargs[key.replace("-", "_")] = _value(value) if value else True
    return kwargs


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def vllm_generator(model_dir: str | Path, tokenizer: Any, gen: Any, flags: str | None = None) -> Any:
    """eval's Generator on vLLM's offline engine with the `generate` section's settings (GenerateArgs); answers
    without their end-of-turn token, as peftkit's engine gives them."""
    from peftkit.data.template import stop_token_ids

    stops = stop_token_ids(tokenizer)
    sampling = {"temperature": gen.temperature if gen.do_sample else 0.0, "top_p": gen.top_p if gen.do_sample else 1.0,
                "top_k": gen.top_k if gen.do_sample else 0, "repetition_penalty": gen.repetition_penalty,
                "max_tokens": gen.max_new_tokens, "seed": 0}
    extra = engine_args(flags)

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        answers = generate_offline(model_dir, prompts, sampling, stops, extra)
        return [a[:-1] if a and a[-1] in stops else a for a in answers]

    return generate


def vllm_unusable(model_dir: str | Path) -> str | None:
    """Why `--engine auto` does not take vLLM for `model_dir` (None: it does)."""
    if find_vllm() is None:
        return NOT_INSTALLED
    return model_refusal(model_dir)
