"""The family table: every model-architecture fact peftkit acts on, read from a transformers config.

One place for what differs between families, so a new family is one edit here and a row of the family test tier
(tests/families/): which layers mix tokens other than through attention (packing refused), sliding windows (the
engine's shared-prefix cache), output layers the chunked loss may skip, norms the one-cast patch touches, decoder
layer names (freeze tuning), the float64 load of export's check (MoE experts), GGUF architectures.
"""

from __future__ import annotations

from typing import Any

# Layer types (config.layer_types) that carry state from one token to the next outside attention: linear attention
# (Gated DeltaNet, Mamba-2 mixers), short convolutions, state-space layers. Restarting position_ids isolates the
# records of a packed row for softmax attention only; these run straight across them.
STATEFUL_LAYER_TYPES = ("linear_attention", "conv", "mamba", "mamba2", "ssm", "recurrent", "lightning_attention")
# Families whose every layer (or every layer's parallel branch) is such a mixer, without layer_types saying so.
STATEFUL_MODELS = {
    "falcon_h1": "Mamba-2 mixers beside attention in every layer",
    "lfm2_moe": "short convolutions",
    "mamba": "state-space layers", "mamba2": "state-space layers", "falcon_mamba": "state-space layers",
    "rwkv": "recurrent layers", "recurrent_gemma": "recurrent layers", "xlstm": "recurrent layers",
}

# Families whose forward builds its attention mask without position_ids, so restarting them does not isolate the
# records of a packed row (found by the family tier: packed gradients differ from the records one by one).
PACKING_LEAKS = {"gpt_oss": "builds its attention mask without position_ids",
                 "afmoe": "builds its attention mask without position_ids"}
# Families the family tier proves packed == one by one (tests/families/): others are checked on the model itself
# before training (train/isolation.py).
PACKING_PROVEN = ("llama", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "gemma4_text", "mistral", "mixtral",
                  "phi3", "gpt2", "gpt_neox", "olmo2", "deepseek_v3")

# Decoder layers whose two norms feed only linear projections (pre-norm; no post-attention norm on the residual).
PRE_NORM_MODELS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "smollm3")
PRE_NORM_NORMS = ("input_layernorm", "post_attention_layernorm")

# Architectures whose logits are exactly output_layer(hidden): no scaling or soft-capping after it.
PLAIN_OUTPUT_MODELS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "gemma")

# Where the N-th decoder (or encoder) layer's parameters sit: Llama-style `layers.N`, BERT-style `layer.N`,
# GPT-2 / Falcon / BLOOM-style `h.N`, MPT-style `blocks.N`.
LAYER_NAME_PATTERN = r"\.(?:layers?|h|blocks)\.{index}\."

# Module names of an image-text model's vision side (tower, projector): freeze tuning's layer numbers count the
# language model's decoder layers only, so these never match them.
VISION_PARTS = ("vision_tower", "visual", "vision_model", "multi_modal_projector", "mm_projector", "embed_vision",
                "connector")
TOWERS = ("vision_tower", "visual", "vision_model")  # the vision encoder's module, by family
PROJECTORS = ("multi_modal_projector", "mm_projector", "embed_vision", "connector")  # image features → text embeddings
VISUAL_PROJECTORS = ("merger", "deepstack_merger_list")  # Qwen-VL's, inside `visual`

# transformers architecture → GGUF architecture (the ones transformers can also read back to check).
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "llama",
                      "Phi3ForCausalLM": "phi3", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe",
                      "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}
# GGUF architectures whose llama.cpp graph applies the file's attention.sliding_window to its sliding layers (for
# the others a window would be dropped, so a model with one is refused).
GGUF_SLIDING_WINDOW = ("gemma2", "gemma3")
# What transformers' GGUF reader (which checks the file) does not read back but takes from the config class's
# defaults or sets itself, so a model with other values cannot be verified ("default": the config class's own value
# for this many layers). Qwen3's and Qwen3-MoE's published checkpoints have these values (head_dim 128; experts 768
# wide, routing weights renormalised); so do Gemma 2 2B / 9B and Gemma 3 270M / 1B (head_dim 256 = the query
# scale's 256, which llama.cpp takes as head_dim; the alternating / 5:1 layer pattern; Gemma 3 without rope
# scaling: the reader does not read llama.cpp's rope.scaling keys).
DEFAULT = "default"
_GEMMA = {"head_dim": 256, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
          "tie_word_embeddings": True, "layer_types": DEFAULT}
GGUF_READER_FIXED: dict[str, dict[str, Any]] = {"Qwen3ForCausalLM": {"head_dim": 128},
                     "Qwen3MoeForCausalLM": {"moe_intermediate_size": 768, "norm_topk_prob": True},
                     "Gemma2ForCausalLM": {**_GEMMA, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
                     "Gemma3ForCausalLM": {**_GEMMA, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                                           "use_bidirectional_attention": False, "rope_parameters": DEFAULT}}


def is_image_text(config: Any) -> bool:
    """An image-text checkpoint (a vision tower beside its language model), loaded as AutoModelForImageTextToText."""
    return getattr(config, "vision_config", None) is not None


def vision_parts(model: Any) -> tuple[list[str], list[str]]:
    """(vision tower, projector) module names of an image-text model: what finetuning.freeze_vision_tower and
    freeze_multi_modal_projector keep frozen (Qwen-VL's projector, `visual.merger`, sits inside its tower)."""
    towers: list[str] = []
    projectors: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if leaf in PROJECTORS or (parent.endswith("visual") and leaf in VISUAL_PROJECTORS):
            if type(module).__name__ == "ModuleList":  # Qwen3-VL's deepstack mergers: each one (peft wraps modules)
                projectors += [f"{name}.{child}" for child, _ in module.named_children()]
            else:
                projectors.append(name)
        elif leaf in TOWERS and not any(name.startswith(t + ".") for t in towers):
            towers.append(name)
    return towers, projectors


# Image-text families whose image prompts peftkit's engine cannot prefill exactly: the engine gives every token a
# 1-D position, so a family that positions an image in 3-D (Qwen-VL's mrope) would answer differently from
# transformers' own. (Gemma 3's bidirectional attention within an image comes from the prompt's token_type_ids,
# which the engine passes at prefill: tested equal to generate; Gemma 4's and PaliGemma's masks are not tested.)
IMAGE_ENGINE_REFUSED = {
    "qwen2_vl": "3-D rope positions", "qwen2_5_vl": "3-D rope positions", "qwen3_vl": "3-D rope positions",
    "qwen3_vl_moe": "3-D rope positions", "qwen3_5": "3-D rope positions", "qwen3_5_moe": "3-D rope positions",
    "gemma4": "an image attention mask peftkit has not tested", "paligemma": "bidirectional attention over the prefix",
}


def image_prompt_refusal(config: Any) -> str | None:
    """Why peftkit's engine refuses image prompts for this model (None: it answers them exactly)."""
    model_type = getattr(config, "model_type", "")
    if model_type not in IMAGE_ENGINE_REFUSED:
        return None
    return (f"image prompts: {model_type} gives an image {IMAGE_ENGINE_REFUSED[model_type]}, which peftkit's engine "
            "does not reproduce (it would answer differently from transformers); serve or evaluate this model's "
            "image prompts with --engine vllm")


def text_config(config: Any) -> Any:
    """The language model's config (an image-text config's text part; a text config itself)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def stateful_layers(config: Any) -> str | None:
    """What in this family mixes tokens outside attention (so packed records would leak), or None."""
    text = text_config(config)
    model_type = model_type_of(config)
    if model_type in STATEFUL_MODELS:
        return STATEFUL_MODELS[model_type]
    kinds = sorted({t for t in (getattr(text, "layer_types", None) or []) if t in STATEFUL_LAYER_TYPES})
    if kinds:
        return " and ".join(f"{k} layers" for k in kinds)
    return None


def model_type_of(config: Any) -> str:
    return getattr(text_config(config), "model_type", None) or getattr(config, "model_type", None) or "this model"


def packing_refusal(config: Any) -> str | None:
    """The message refusing `data.packing` for a family known not to isolate packed records, or None."""
    model_type = model_type_of(config)
    if model_type in PACKING_LEAKS:
        return (f"data.packing: {model_type} {PACKING_LEAKS[model_type]}, so the records of a packed row would "
                "attend to each other. Set data.packing: false (batches are then padded per record)")
    what = stateful_layers(config)
    if what is None:
        return None
    return (f"data.packing: {model_type} has {what}, which carry state from one token to the next, so the records of a "
            "packed row would see each other (restarting position_ids isolates attention only, and transformers' "
            "kernels for these layers take no sequence boundaries on this path). Set data.packing: false (batches "
            "are then padded per record)")


def packing_proven(config: Any) -> bool:
    """Whether the family tier proves this family's packed rows equal to its records one by one."""
    return model_type_of(config) in PACKING_PROVEN


def sliding_window(config: Any) -> int | None:
    """The smallest attention window any layer uses (None: every layer attends to the whole sequence)."""
    text = text_config(config)
    window = getattr(text, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types and "sliding_attention" not in layer_types:
        return None
    if getattr(text, "use_sliding_window", True) is False:  # qwen2-style configs keep the key but switch it off
        return None
    return window


def transposed_projections(model: Any) -> bool:
    """GPT-2-style models store their projections as transformers' Conv1D (weight [in, out]): LoRA is then made
    with fan_in_fan_out (peft otherwise switches it on itself, with a warning on every run)."""
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


def is_mixture_of_experts(config: Any) -> bool:
    text = text_config(config)
    return any(isinstance(getattr(text, k, None), int) and getattr(text, k) > 1
               for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def float64_load_kwargs(config: Any) -> dict[str, Any]:
    """Extra from_pretrained arguments for a float64 load (export's check): transformers 5's default experts
    kernel refuses float64 ("grouped_mm ... float64"), its eager loop computes it."""
    return {"experts_implementation": "eager"} if is_mixture_of_experts(config) else {}


def gguf_refusal(config: Any) -> str | None:
    """Why this model cannot become a GGUF peftkit writes and checks, or None; asked before any merging."""
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in GGUF_ARCHITECTURES:
        return (f"--format gguf: {architecture} is not written here (GGUF covers "
                f"{', '.join(sorted(GGUF_ARCHITECTURES))}); export the merged folder (--format merged) and convert "
                "it with llama.cpp's convert_hf_to_gguf.py")
    text = text_config(config)
    for key, value in GGUF_READER_FIXED.get(architecture, {}).items():
        have = getattr(text, key, None)
        want = _class_default(text, key) if value == DEFAULT else value
        if key == "rope_parameters" and isinstance(have, dict) and isinstance(want, dict):  # the theta is written
            have, want = _without_full_theta(have), _without_full_theta(want)
        if have != want:
            return (f"--format gguf: this {architecture} has {key} {have}; transformers' GGUF reader, which checks "
                    f"the file, assumes {want}, so the file could not be verified. Export the merged folder "
                    "(--format merged) and convert it with llama.cpp's convert_hf_to_gguf.py")
    window = sliding_window(config)
    context = getattr(text, "max_position_embeddings", None)
    if GGUF_ARCHITECTURES[architecture] not in GGUF_SLIDING_WINDOW and window is not None and (
            context is None or window < context):
        return (f"--format gguf: this {architecture} attends through a sliding window of {window} tokens (context "
                f"{context}), which the GGUF written here (llama.cpp's llama graph) cannot carry: llama.cpp would attend "
                "to the whole context and answer differently beyond the window. Export the merged folder "
                "(--format merged) and serve it with transformers or vLLM")
    return None


def _class_default(text: Any, key: str) -> Any:
    """The value the config class itself gives `key` for a model of this many layers (what a reader that does
    not store the key rebuilds)."""
    return getattr(type(text)(num_hidden_layers=text.num_hidden_layers), key, None)


def _without_full_theta(rope: dict[str, Any]) -> dict[str, Any]:
    """Rope parameters less the global layers' theta, which the GGUF file carries (rope.freq_base)."""
    if "full_attention" not in rope:
        return {k: v for k, v in rope.items() if k != "rope_theta"}
    return {**rope, "full_attention": {k: v for k, v in rope["full_attention"].items() if k != "rope_theta"}}
