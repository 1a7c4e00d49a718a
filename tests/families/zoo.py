"""Tiny random models of the families users bring, built from transformers' own config classes.

hidden 64, 2 layers (4 where a family alternates layer kinds), the test tokenizer's vocabulary; weights do not
change masks, packing or generation paths, so each family's code path is exercised as on a real checkpoint.
"""

from __future__ import annotations

from typing import Any

COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 512}
WINDOW = 8  # sliding windows shorter than the tests' prompt-length differences
# Families whose packed records would leak (model/families.py refuses data.packing for them)
# linear attention, convolution, state-space layers
STATEFUL = ("granitemoehybrid", "lfm2", "qwen3_5", "qwen3_5_vl", "qwen3_next")
NO_PACKING = (*STATEFUL, "gpt_oss")  # gpt_oss builds its attention mask without position_ids

# family name → (model_type, config overrides); "drop" removes COMMON keys a config does not take
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "qwen3_moe": ("qwen3_moe", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "qwen3_next": ("qwen3_next", {"head_dim": 16, "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 2,
                                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                                  "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                                  "linear_value_head_dim": 16, "full_attention_interval": 2}),
    "qwen3_5": ("qwen3_5_text", {"head_dim": 16, "num_hidden_layers": 4, "linear_num_value_heads": 4,
                                 "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                                 "full_attention_interval": 2}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": WINDOW}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": WINDOW, "num_hidden_layers": 4,
                               "sliding_window_pattern": 2}),
    "gemma4": ("gemma4_text", {"head_dim": 16, "global_head_dim": 16, "sliding_window": WINDOW, "num_hidden_layers": 4}),
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512,
                      "drop": ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "max_position_embeddings"]}),
    "gpt_neox": ("gpt_neox", {"drop": ["num_key_value_heads"]}),
    "olmo2": ("olmo2", {}),
    # MLA: key / value heads as many as query heads, as in the published config
    "deepseek_v3": ("deepseek_v3", {"num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                    "moe_intermediate_size": 32,
                                    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                                    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                                    "v_head_dim": 16}),
    "gpt_oss": ("gpt_oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW}),
    "lfm2": ("lfm2", {"num_hidden_layers": 4, "full_attn_idxs": [1, 3]}),
    "granitemoehybrid": ("granitemoehybrid", {"num_hidden_layers": 4, "layer_types": ["mamba", "attention"] * 2,
                                              "num_local_experts": 0, "mamba_n_heads": 8, "mamba_d_head": 16,
                                              "mamba_d_state": 16, "mamba_n_groups": 1, "shared_intermediate_size": 128}),
    # image-text checkpoints, trained on text (their vision towers tiny and unused): what AutoModelForCausalLM loads
    "gemma3_vl": ("gemma3", {"text_config": {"head_dim": 16, "sliding_window": WINDOW, "num_hidden_layers": 4,
                                             "sliding_window_pattern": 2},
                             "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                             "mm_tokens_per_image": 4}),
    "qwen3_5_vl": ("qwen3_5", {"text_config": {"head_dim": 16, "num_hidden_layers": 4, "linear_num_value_heads": 4,
                                               "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                                               "linear_value_head_dim": 16, "full_attention_interval": 2},
                               "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                                 "out_hidden_size": 64, "patch_size": 8}}),
}


def config_of(family: str, vocab_size: int, pad_token_id: int | None, bos: int | None, eos: int | None) -> Any:
    from transformers import AutoConfig

    model_type, overrides = FAMILIES[family]
    overrides = dict(overrides)
    ids = {"vocab_size": vocab_size, "pad_token_id": pad_token_id, "bos_token_id": bos, "eos_token_id": eos}
    if "text_config" in overrides:  # an image-text config: the common sizes go to its language model
        overrides["text_config"] = {**COMMON, **overrides["text_config"], **ids}
        return AutoConfig.for_model(model_type, **overrides, **ids)
    kwargs = {k: v for k, v in COMMON.items() if k not in overrides.pop("drop", [])}
    kwargs.update(overrides, **ids)
    return AutoConfig.for_model(model_type, **kwargs)
