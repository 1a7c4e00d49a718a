"""Quantized bases (QLoRA): bitsandbytes 4-bit (nf4 / fp4, double quantization) or 8-bit through
transformers' BitsAndBytesConfig; checkpoints that are already quantized (config.json carries a
`quantization_config`: GPTQ, AWQ, bnb, ...) load as they are. Only LoRA trains on a quantized base.

The checks here run before any model loads (config/validate.py), and the weight-memory estimate reads
config.json only (the model is built on the meta device), so a user sees whether a model fits first.
"""

from __future__ import annotations

import importlib.util
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config.schema import ModelArgs

# Where bitsandbytes >= 0.45 runs: CUDA GPUs, and CPUs through its multi-backend (x86-64 with AVX2, ARM64).
_CPU_MACHINES = ("x86_64", "amd64", "aarch64", "arm64")


def prequantized(path: str | Path) -> str | None:
    """The quant_method of a checkpoint folder whose config.json carries a quantization_config, else None."""
    config = Path(path) / "config.json"
    try:
        quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return None
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else None


def _prequantized_model(args: ModelArgs) -> str | None:
    """prequantized() of model.name_or_path; None for a name that does not resolve (reported when the model loads)."""
    from peftkit.model.resolve import resolve_model

    try:
        return prequantized(resolve_model(args.name_or_path))
    except Exception:  # noqa: BLE001 - an unresolvable name is reported when the model loads
        return None


def quantized_base(args: ModelArgs) -> bool:
    """Whether training will see a quantized base: quantization_bit set, or a pre-quantized checkpoint."""
    return args.quantization_bit is not None or _prequantized_model(args) is not None


def is_quantized(model: Any) -> bool:
    """Whether the model's (base) weights are quantized: merging LoRA into them would not be exact."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None) is not None)


def keep_unpacked_4bit(model: Any) -> int:
    """Keeps every bitsandbytes 4-bit layer in its ordinary weight layout on every CPU; returns how many were switched.

    bitsandbytes 0.49-0.50 on a CPU with AVX512-BF16 (`support_avx512bf16_for_cpu`) repacks a Linear4bit's weight
    in place for a bf16 kernel the first time the layer runs in eval mode without gradients. Measured with 0.50.2
    on an AVX512-BF16 CPU: the repack needs out_features % 32 == 0 and in_features % blocksize (64) == 0, else a
    reshape error (`shape '[32, 0]' is invalid`); once repacked, a training forward goes through that kernel, which
    has no backward (a TypeError in backward; with a bias, an in-place error), so training after an evaluation
    dies; the absmax is kept in bf16, so saving re-quantizes it; and eval computes in bf16 while training computes
    in the compute dtype (0.005 apart on a 128 -> 64 layer). With the flag off, any layer width works and this CPU
    runs the same 4-bit path as one without AVX512-BF16. A version without the attribute is left as it is."""
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def check_quantization(model: ModelArgs, finetuning_type: str) -> list[str]:
    """Problems with model.quantization_bit here, before any model loads."""
    if model.quantization_bit is None:
        return []
    key = f"model.quantization_bit={model.quantization_bit}"
    if model.quantization_bit not in (4, 8):
        return [f"{key}: must be 4 (QLoRA: nf4 / fp4) or 8 (LLM.int8), or null for an unquantized base"]
    issues = []
    if finetuning_type != "lora":
        issues.append(f"{key}: only LoRA trains on a quantized base (quantized weights have no gradients); set "
                      f"finetuning.finetuning_type: lora, or drop the key for {finetuning_type} fine-tuning")
    if importlib.util.find_spec("bitsandbytes") is None:
        issues.append(f"{key} needs bitsandbytes: pip install 'peftkit[quantization]'")
    elif not _cuda() and platform.machine().lower() not in _CPU_MACHINES:
        issues.append(f"{key}: bitsandbytes runs on CUDA GPUs and on x86-64 / ARM64 CPUs, not on this "
                      f"{platform.machine()} machine without CUDA")
    method = _prequantized_model(model)
    if method:
        issues.append(f"{key}: {model.name_or_path} is already quantized ({method}); drop model.quantization_bit "
                      "to train LoRA on it as it is")
    return issues


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(args: ModelArgs) -> Any:
    """The dtype quantized layers compute in: as set, else bf16 on a GPU that has it, else the model dtype
    (float32 unless set)."""
    import torch

    if args.quantization_compute_dtype != "auto":
        return getattr(torch, args.quantization_compute_dtype)
    if _cuda() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return getattr(torch, args.dtype) if args.dtype in ("bfloat16", "float16") else torch.float32


def bnb_config(args: ModelArgs) -> Any:
    """transformers' BitsAndBytesConfig for model.quantization_bit (None when it is unset)."""
    if args.quantization_bit is None:
        return None
    from transformers import BitsAndBytesConfig

    if args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quantization_type,
                              bnb_4bit_use_double_quant=args.double_quantization,
                              bnb_4bit_compute_dtype=compute_dtype(args))


def prepare_quantized(model: Any, gradient_checkpointing: bool, checkpointing_kwargs: dict | None) -> Any:
    """peft's preparation of a k-bit base: norms and head in float32, input gradients on (needed by
    checkpointing with frozen embeddings), and non-reentrant checkpointing when it is on."""
    import warnings

    from peft import prepare_model_for_kbit_training

    with warnings.catch_warnings():
        # peft 0.17-0.21 calls transformers' `gradient_checkpointing_enable`, an alias transformers 5.24 deprecated
        # for `activation_checkpointing_enable` (same effect): the FutureWarning is peft's to fix, not the user's.
        warnings.filterwarnings("ignore", message="`gradient_checkpointing_enable` is deprecated", category=FutureWarning)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs=checkpointing_kwargs or {"use_reentrant": False})


@dataclass
class MemoryEstimate:
    """Weights only: activations, optimizer state and the KV cache come on top."""

    parameters: int
    quantized: int  # parameters in quantized linear layers
    weight_bytes: int
    what: str

    def line(self) -> str:
        return (f"model: {self.parameters / 1e6:,.1f}M parameters; weights {self.what}: "
                f"~{self.weight_bytes / 2**30:.2f} GiB (activations, optimizer state and LoRA come on top)")


# Bytes per parameter of a quantized linear layer: 4-bit codes plus a float32 absmax per 64-value block
# (double quantization: an 8-bit absmax per block, float32 per 256 blocks); 8-bit codes plus a float32
# scale per output row (counted per parameter as ~0).
_QUANTIZED_BYTES = {(4, False): 0.5 + 4 / 64, (4, True): 0.5 + 1 / 64 + 4 / (64 * 256), (8, False): 1.0, (8, True): 1.0}


def estimate_memory(args: ModelArgs) -> MemoryEstimate | None:
    """Weight memory of the model as configured, from its config.json (None when it cannot be read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.model.resolve import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(args.name_or_path), trust_remote_code=args.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    except Exception:  # noqa: BLE001 - an estimate is a courtesy; loading reports real problems
        return None
    head = model.get_output_embeddings()
    seen: set[int] = set()
    total = linear = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if isinstance(module, torch.nn.Linear) and module is not head:
                linear += p.numel()
    dtype_bytes = 2 if args.dtype in ("bfloat16", "float16") else 4
    if args.quantization_bit is None:
        return MemoryEstimate(total, 0, total * dtype_bytes, f"in {args.dtype or 'float32'}")
    per = _QUANTIZED_BYTES[args.quantization_bit, args.double_quantization]
    # peft's k-bit preparation keeps the rest (embeddings, norms, head) in float32
    name = f"{args.quantization_type}" if args.quantization_bit == 4 else "int8"
    dq = " + double quantization" if args.quantization_bit == 4 and args.double_quantization else ""
    return MemoryEstimate(total, linear, int(linear * per + (total - linear) * 4),
                          f"at {args.quantization_bit}-bit {name}{dq} (the rest float32)")
