"""A merged transformers folder → one GGUF file for llama.cpp / Ollama, with the `gguf` package's writer.

The layout follows llama.cpp's own converter (convert_hf_to_gguf.py) for the architectures written
here: tensor names from `gguf.get_tensor_name_map`, Llama's q / k rows permuted to llama.cpp's rotary
layout, 1-D tensors (norms, biases) kept in float32, a tied output layer left out (llama.cpp reuses the
embedding). The tokenizer goes in as a GPT-2 style BPE vocabulary with its merges, special token ids and
the run's chat template, so llama.cpp and Ollama render prompts as training did. The file is read back
by transformers (`gguf_file=`) in export's checks (export/llamacpp.py: export_gguf).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.model.families import GGUF_ARCHITECTURES, GGUF_SLIDING_WINDOW

QUANTS = ("f16", "bf16", "q8_0")


def _pre_tokenizer(model_type: str, tokenizer: Any) -> str:
    """llama.cpp's name for the pre-tokenizer regex (its converter identifies it by hashing a test encoding)."""
    vocab = tokenizer.get_vocab()
    if model_type == "qwen2":
        return "qwen2"
    if "<|begin_of_text|>" in vocab:
        return "llama-bpe"
    if "<|im_start|>" in vocab and len(vocab) == 49152:
        return "smollm"
    return "default"


def tokenizer_refusal(folder: Path) -> str | None:
    """Why the tokenizer in `folder` (its tokenizer.json) cannot be written as this writer's byte-level BPE
    vocabulary, or None. A SentencePiece-style vocabulary (Metaspace, byte fallback: Llama 2, Mistral v0.1,
    Gemma) written so would tokenize differently in llama.cpp; asked before any merging."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # no fast tokenizer file to judge by: the read-back check after writing decides
    kinds = set(re.findall(r'"type":\s*"(\w+)"', json.dumps([data.get("pre_tokenizer"), data.get("decoder")])))
    model = data.get("model") or {}
    if model.get("type") == "BPE" and "ByteLevel" in kinds and not model.get("byte_fallback"):
        return None
    kind = "Metaspace" if "Metaspace" in kinds else (model.get("type") or "unknown")
    fallback = " with byte fallback" if model.get("byte_fallback") else ""
    return (f"--format gguf: {folder}'s tokenizer is a {kind} vocabulary{fallback}"
            " (SentencePiece style); the GGUF written here holds byte-level BPE vocabularies only, and llama.cpp would "
            "tokenize prompts differently. Export the merged folder (--format merged) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py, which reads the SentencePiece model")


def _tokens(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[Any]]:
    """Token strings by id (byte-level, as in tokenizer.json) and llama.cpp token types; ids past the
    tokenizer's vocabulary (an embedding padded to a round size) are unused placeholders."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _permute(weight: Any, heads: int) -> Any:
    """q / k rows from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hyperparameters(writer: Any, config: dict[str, Any], arch: str) -> None:
    """The architecture's keys llama.cpp (and transformers' reader) build the graph from."""
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim"):  # llama.cpp reads a head size that is not hidden / heads from these
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = config.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # per layer kind (Gemma 3): llama.cpp takes the global layers' theta
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if arch in GGUF_SLIDING_WINDOW:  # gguf_refusal let a window through only where llama.cpp applies it
        writer.add_sliding_window(config["sliding_window"])
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    experts_count = config.get("num_experts") or config.get("num_local_experts")  # qwen3moe (5.24 names it the latter)
    if experts_count:
        writer.add_expert_count(experts_count)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])


def write_gguf(model_dir: Path, path: Path, quant: str, tokenizer: Any, chat_template: str | None) -> int:
    """Write `model_dir` (a saved transformers checkpoint) as a GGUF file in `quant`; returns its tensor count.

    Raises:
        PeftkitError: an architecture this writer does not support (`quant` is checked by export_gguf).
    """
    import gguf

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch not in GGUF_ARCHITECTURES:
        raise PeftkitError(f"--format gguf: {hf_arch} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)}); "
                           "export a transformers folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    arch = GGUF_ARCHITECTURES[hf_arch]
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(config.get("_name_or_path") or path.stem)
    _hyperparameters(writer, config, arch)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocabulary(writer, model_dir, config, tokenizer, chat_template)
    count = _weights(writer, model_dir, config, hf_arch, arch, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


def _vocabulary(writer: Any, model_dir: Path, config: dict[str, Any], tokenizer: Any, chat_template: str | None) -> None:
    """The tokenizer as a GPT-2 style BPE vocabulary with merges, special ids and the run's chat template."""
    import gguf

    n_vocab = config["vocab_size"]
    tokens, types = _tokens(tokenizer, n_vocab)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(config.get("model_type", ""), tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    special.chat_template = chat_template or special.chat_template  # the run's template, as training rendered it
    special.add_to_gguf(writer, quiet=True)


def _weights(writer: Any, model_dir: Path, config: dict[str, Any], hf_arch: str, arch: str, qtype: Any) -> int:
    """Every tensor of the checkpoint under its GGUF name, in llama.cpp's layout; returns how many were added."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layers)
    state: dict[str, Any] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    count = 0
    experts: dict[tuple[int, str], dict[int, Any]] = {}
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp uses token_embd when there is no output tensor
        data = tensor.astype(np.float32)
        expert = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", hf_name)
        if expert:  # saved one matrix per expert: stacked below into llama.cpp's [experts, out, in] tensors
            experts.setdefault((int(expert[1]), expert[3]), {})[int(expert[2])] = data
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PeftkitError(f"--format gguf: no GGUF name for tensor {hf_name!r} of {hf_arch}")
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _permute(data, heads if "q_proj" in hf_name else kv_heads)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1  # Gemma's norms scale by (1 + weight); llama.cpp's graph (and its converter) by weight
        _add_tensor(writer, name, data, qtype)
        count += 1
    for (layer, kind), by_index in sorted(experts.items()):
        _add_tensor(writer, f"blk.{layer}.ffn_{kind}_exps.weight", np.stack([by_index[e] for e in sorted(by_index)]), qtype)
        count += 1
    return count


def _add_tensor(writer: Any, name: str, part: Any, qtype: Any) -> None:
    """One tensor in `qtype`, except where llama.cpp keeps another type (1-D in float32, rows not 32-wide for Q8_0)."""
    import gguf
    import numpy as np

    if part.ndim == 1:
        writer.add_tensor(name, part)
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and part.shape[-1] % 32:
        writer.add_tensor(name, part.astype(np.float16))  # Q8_0 blocks are 32 wide; llama.cpp does the same
    else:
        writer.add_tensor(name, gguf.quants.quantize(part, qtype), raw_dtype=qtype)


def modelfile(gguf_name: str, stop_tokens: list[str]) -> str:
    """An Ollama Modelfile for the file: Ollama reads the chat template from the GGUF metadata for the
    template families it knows (chatml, llama3, …); the stop tokens and greedy decoding are set here."""
    lines = [f"FROM ./{gguf_name}", ""]
    lines += [f'PARAMETER stop "{t}"' for t in stop_tokens]
    lines += ["PARAMETER temperature 0", ""]
    return "\n".join(lines)


def lora_tensors(model: Any, arch_name: str, config: dict[str, Any]) -> tuple[dict[str, Any], float, dict[str, str]]:
    """A peft LoRA model's adapter as llama.cpp's LoRA GGUF holds it: {"blk.N.attn_q.weight.lora_a": A [r, in],
    "...lora_b": B [out, r]} in float32 (B's rows of q / k permuted like the base weights), and the alpha that
    makes llama.cpp's scale (alpha / r) equal peft's (alpha / r, or alpha / sqrt(r) with rslora); and each
    LoRA module's GGUF tensor name.

    Raises:
        PeftkitError: an architecture, or an adapter (DoRA, bias, per-module ranks), llama.cpp cannot apply.
    """
    import gguf
    import numpy as np

    peft_config = model.peft_config["default"]
    refused = [what for what, bad in (("DoRA", peft_config.use_dora), ("LoRA bias", getattr(peft_config, "lora_bias", False)),
                                      ("per-module ranks or alphas", peft_config.rank_pattern or peft_config.alpha_pattern),
                                      (f"modules_to_save {peft_config.modules_to_save}", peft_config.modules_to_save)) if bad]
    if refused:
        raise PeftkitError(f"--format gguf-lora: llama.cpp's LoRA cannot apply {', '.join(refused)}; export the merged "
                           "model instead (--format gguf)")
    arch = GGUF_ARCHITECTURES.get(arch_name)
    if arch is None:
        raise PeftkitError(f"--format gguf-lora: {arch_name} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config["num_hidden_layers"])
    tensors: dict[str, Any] = {}
    modules: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        hf_name = module_name.removeprefix("base_model.model.") + ".weight"
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise PeftkitError(f"--format gguf-lora: no GGUF name for {hf_name!r} of {arch_name}")
        a = module.lora_A["default"].weight.detach().float().numpy().astype(np.float32)
        b = module.lora_B["default"].weight.detach().float().numpy().astype(np.float32)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            b = _permute(b, heads if "q_proj" in hf_name else kv_heads)  # B's rows are the weight's rows
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a, b
        modules[module_name] = name
    rank = peft_config.r
    alpha = peft_config.lora_alpha * (rank**0.5 if peft_config.use_rslora else 1.0)
    return tensors, float(alpha), modules


def write_gguf_lora(path: Path, arch_name: str, tensors: dict[str, Any], alpha: float, base_name: str) -> int:
    """Write a LoRA adapter GGUF (general.type adapter, adapter.type lora, adapter.lora.alpha) for llama.cpp's
    `--lora`, the layout of llama.cpp's convert_lora_to_gguf.py; returns the tensor count."""
    import gguf

    writer = gguf.GGUFWriter(str(path), GGUF_ARCHITECTURES[arch_name])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"LoRA adapter of {base_name}")
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(tensors)
