"""peftkit and the libraries under it, in one place: the messages it silences at import (imported by
peftkit/__init__.py, before anything imports peft, which imports bitsandbytes), the library versions its touch points
were written against, and every touch point of a library's internals with its guard and measured reason."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Literal


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_library_messages() -> None:
    """bitsandbytes >= 0.49 on a CPU with AVX512-BF16 logs "Failed to load CPU gemm_4bit_forward from
    kernels-community" at import when the `kernels` package is absent. That kernel serves only the repacked
    CPU weight layout, which peftkit keeps off (model/quantization.py: keep_unpacked_4bit), and `kernels`
    would fetch it from the hub at run time; so the line says nothing about peftkit's run and is dropped."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))


# [lowest, first untested) major.minor of each library whose internals the touch points below read.
TESTED_VERSIONS = {"peft": ((0, 17), (0, 22)), "transformers": ((5, 0), (5, 25))}


def _major_minor(version: str) -> tuple[int, int]:
    parts = (version.split("+")[0].split(".") + ["0", "0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def untested_versions(libraries: tuple[str, ...] | None = None) -> list[str]:
    """The libraries (of TESTED_VERSIONS, or those named) installed at a version outside their tested range."""
    out = []
    for name in libraries or tuple(TESTED_VERSIONS):
        low, high = TESTED_VERSIONS[name]
        installed = _installed(name)
        if not low <= _major_minor(installed) < high:
            out.append(f"{name} {installed}")
    return out


@functools.cache
def _installed(name: str) -> str:
    """A library's installed version, read once per process (the engine asks on every start: each chat reply, each
    GRPO step)."""
    from importlib.metadata import version

    return version(name)


def tested_range() -> str:
    """TESTED_VERSIONS as 'peft 0.17-0.21, transformers 5.0-5.24'."""
    return ", ".join(f"{n} {a[0]}.{a[1]}-{b[0]}.{b[1] - 1}" for n, (a, b) in TESTED_VERSIONS.items())


@dataclass(frozen=True)
class TouchPoint:
    """One place peftkit reaches past a library's documented surface, and what keeps it safe."""

    where: str  # "module:function" that does it
    library: str
    what: str
    # speedups: behind train.peftkit_speedups (auto: only inside TESTED_VERSIONS; off: never);
    # version: TESTED_VERSIONS checked where it runs, a warning outside them;
    # checked: compared with the public path at run time, a difference raises; public: a documented extension point.
    guard: Literal["speedups", "version", "checked", "public"]
    reason: str  # what it buys, as measured


# Every touch point; tests/unit/test_libraries.py fails on a library internal used in a module not listed here.
TOUCH_POINTS = (
    TouchPoint("peftkit.train.fused_lora:fused_lora_forward", "peft", "LoRA Linear's forward replaced", "speedups",
               "the update added into the projection's output in place (train/speedups.py; benchmarks/RESULTS.md)"),
    TouchPoint("peftkit.train.precision:one_cast_per_activation", "peft", "peft's input up-cast off, norms cast once",
               "speedups", "one bf16 cast per activation for all its consumers (train/speedups.py)"),
    TouchPoint("peftkit.model.value_head:hidden_states_as_logits", "transformers", "the output layer's forward "
               "passed through (the model returns hidden states)", "speedups",
               "the chunked loss: logits only for supervised tokens, a chunk at a time (805 MB of logits never built); "
               "rm's scores read the last hidden state without computing logits. An explicit train.chunked_loss: true "
               "and the rm objective warn outside TESTED_VERSIONS"),
    TouchPoint("peftkit.train.allocator:keep_freed_memory", "glibc", "mallopt's mmap and trim thresholds", "speedups",
               "4 CPU steps 82.3 -> 77.6 s fp32, 34.8 -> 33.0 s bf16, peak RSS unchanged"),
    TouchPoint("peftkit.infer.slots:_SlotLayer", "transformers", "CacheLayerMixin subclassed", "version",
               "the engine's slot KV cache (rows sharing one write column): continuous batching in peftkit's engine"),
    TouchPoint("peftkit.infer.engine:Engine", "transformers", "the forward's cache keyword read from its signature",
               "version", "transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40)"),
    TouchPoint("peftkit.data.render:renderer", "transformers", "the private _compile_jinja_template", "checked",
               "chat templates rendered without apply_chat_template's per-call overhead (2,740 -> 5,642 records/s "
               "with the other preprocessing changes); the first conversation of each template rendered both ways"),
    TouchPoint("peftkit.model.attention:register_varlen", "transformers", "AttentionInterface / mask interface "
               "registries", "public", "torch_varlen: packed rows attend per record without a 4-D mask"),
    TouchPoint("peftkit.infer.engine:_contiguous_output_layer_input", "torch", "a forward pre-hook on the output "
               "layer", "public", "a prefill of 16 prompts spent 1.7 s copying the 49152 x 576 weight per row"),
)

_warned: set[str] = set()


def warn_untested(what: str, libraries: tuple[str, ...], then: str = "") -> bool:
    """True where `libraries` are installed outside TESTED_VERSIONS (the caller may then take its plain path), with a
    warning once per process: "WHAT for LIBRARY VERSION (written against ...)THEN"."""
    untested = untested_versions(libraries)
    if not untested:
        return False
    key = f"{what}: {', '.join(untested)}"
    if key not in _warned:
        _warned.add(key)
        logging.getLogger("peftkit").warning("%s for %s (written against %s)%s", what, ", ".join(untested),
                                             tested_range(), then)
    return True
