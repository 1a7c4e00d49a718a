"""Library messages peftkit silences at import, each with the reason beside it (imported by peftkit/__init__.py,
before anything imports peft, which imports bitsandbytes)."""

from __future__ import annotations

import logging


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
