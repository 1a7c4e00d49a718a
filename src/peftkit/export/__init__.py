"""`peftkit export`: the targets in one table, each a checked output of a trained run.

merged: a folder plain transformers (and vLLM) loads; gguf: one llama.cpp / Ollama file; gguf-lora: llama.cpp's
adapter file. Every target refuses what it cannot carry before any merging, checks what it wrote against the run,
and moves it into place only then. `--push-to-hub` uploads any of them afterwards (export/hub.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.export.checks import ExportReport


@dataclass(frozen=True)
class Target:
    """One export format: the function that writes and checks it ("module:function", loaded when used), the options
    it takes, and what is printed when it has landed."""

    writer: str
    options: tuple[str, ...]
    landed: Callable[[ExportReport, dict[str, Any]], str]


TARGETS: dict[str, Target] = {
    "merged": Target("peftkit.export.merged:export_merged", ("max_shard_size",), lambda r, o: (
        f"exported to {r.out}: max logit difference {r.max_logit_diff:.2e}, {r.records_checked} training records "
        "re-rendered identically")),
    "gguf": Target("peftkit.export.llamacpp:export_gguf", ("quant",), lambda r, o: (
        f"exported to {r.out}: max logit difference {r.max_logit_diff:.3g} ({o['quant']}), {r.records_checked} "
        f"training records re-rendered identically; Ollama: `ollama create NAME -f {Path(r.out).parent / 'Modelfile'}`")),
    "gguf-lora": Target("peftkit.export.llamacpp:export_gguf_lora", (), lambda r, o: (
        f"exported the adapter to {r.out}: (alpha/r)·B·A equals peft's delta weights within {r.max_logit_diff:.2g}; "
        f"llama.cpp: `llama-cli -m BASE.gguf --lora {r.out}`")),
}


def export(run_dir: str | Path, out: str | Path, format: str = "merged", overwrite: bool = False,
           **options: Any) -> ExportReport:
    """Write the run as `format` (a TARGETS key) into `out`, checked; `options` are that target's own (max_shard_size,
    quant)."""
    import importlib

    target = TARGETS.get(format)
    if target is None:
        raise PeftkitError(f"--format {format}: one of {', '.join(TARGETS)}")
    unknown = set(options) - set(target.options)
    if unknown:
        raise PeftkitError(f"--format {format} takes no {', '.join(sorted(unknown))}")
    module, _, name = target.writer.partition(":")
    return getattr(importlib.import_module(module), name)(run_dir, out, overwrite=overwrite, **options)


__all__ = ["TARGETS", "ExportReport", "Target", "export"]
