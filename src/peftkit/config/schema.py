"""The config sections: one dataclass each, every field documented once in its `help`.

The `train` section is not here: it takes transformers' Seq2SeqTrainingArguments field names as
they are (see `peftkit.config.load`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _f(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at the call site
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArgs:
    name_or_path: str = _f(
        "smollm2-135m-instruct",
        "`smollm2-135m-instruct` (the embedded default), a local folder, or a hub id.",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = _f(
        None, "Weight dtype; `auto` takes the checkpoint's. None: float32, except training with train.bf16 / fp16 on "
        "CUDA: frozen weights in that dtype, trainable ones in float32. Mixed precision is train.bf16 / train.fp16."
    )
    attn_implementation: str | None = _f(
        None, "eager, sdpa, flash_attention_2, flex_attention or torch_varlen; None: sdpa, or for packed training "
        "on CUDA flash_attention_2 / torch_varlen (model/attention.py)."
    )
    trust_remote_code: bool = _f(False, "Allow model code from the checkpoint folder (e.g. Yuan2).")
    quantization_bit: int | None = _f(
        None, "Load the base quantized with bitsandbytes for QLoRA: 4 (nf4 / fp4) or 8 (LLM.int8); LoRA only. "
        "None: not quantized. A checkpoint that is already quantized (GPTQ, AWQ, bnb) loads as it is without it."
    )
    quantization_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type (quantization_bit 4).")
    double_quantization: bool = _f(True, "Quantize the 4-bit block scales too (~0.4 bits per parameter saved).")
    quantization_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "dtype quantized layers compute in; auto: bfloat16 on a GPU that has it, else model.dtype."
    )


FORMAT_NAMES = ("alpaca", "sharegpt", "messages", "preference", "text", "pairs")


@dataclass
class DatasetSpec:
    """One dataset of `data.train` / `data.eval`: a path with its own format and column names."""

    path: str = _f("", "A file (.json .jsonl .csv .tsv .parquet .txt), a folder of them, or a hub dataset id.")
    format: str | None = _f(None, "This dataset's record format; None takes data.format.")
    columns: dict[str, str] | None = _f(
        None, "Field renames, peftkit name -> the file's name, e.g. {instruction: question, output: answer}."
    )
    tags: dict[str, str] | None = _f(
        None, "sharegpt role tags (role_tag, content_tag, user_tag, assistant_tag, system_tag, observation_tag, "
        "function_tag); None takes data.tags."
    )
    max_samples: int | None = _f(None, "Use only the first N records of this dataset; None takes data.max_samples.")
    split: str = _f("train", "Hub datasets only: the split to read.")


@dataclass
class DataArgs:
    train: str | list[str | dict] | None = _f(
        None, "Training data: a path, or a list of paths and {path, format, columns, tags, max_samples} mappings."
    )
    eval: str | list[str | dict] | None = _f(None, "Evaluation data for eval_loss during training (as data.train).")
    format: Literal["alpaca", "sharegpt", "messages", "preference", "text", "pairs"] = _f(
        "alpaca",
        "Record format: alpaca (instruction/input/output), sharegpt or messages (conversations of "
        "{from, value} or messages of {role, content}), preference (chosen/rejected), text (documents), "
        "pairs (text/text_pair/label).",
    )
    columns: dict[str, str] | None = _f(None, "Field renames for every dataset (see DatasetSpec.columns).")
    tags: dict[str, str] | None = _f(None, "sharegpt role tags for every dataset (see DatasetSpec.tags).")
    template: str | None = _f(
        None,
        "Chat template: None uses the tokenizer's own; a shipped name (alpaca, chatml, llama3, yuan2) "
        "or a path to a .jinja file.",
    )
    system: str | None = _f(
        None, "System message for every conversation that has none; None leaves the chat template's own default "
        "(SmolLM2's adds a 20-token line to every record), \"\" gives an empty one. Eval and export checks use it too.",
    )
    cutoff_len: int = _f(1024, "Maximum tokens per example (and per packed row); truncation keeps part of every response.")
    max_samples: int | None = _f(None, "Use only the first N records of each dataset.")
    mask: Literal["assistant", "last", "all"] = _f(
        "assistant", "Supervised tokens: every assistant turn, only the last one, or every token. "
        "A message with `train: false` is never supervised."
    )
    reasoning: Literal["train", "mask", "drop"] = _f(
        "train", "Assistant reasoning (`reasoning_content`, or content opening with <think>...</think>): supervised "
        "(train), shown to the model but not supervised (mask), or removed from the text (drop)."
    )
    packing: bool = _f(False, "Pack records into rows of cutoff_len tokens; records never attend to each other.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = _f(
        "concat", "Several datasets: concatenate, or interleave until the first (under) / last (over) runs out."
    )
    interleave_probs: list[float] | None = _f(None, "Sampling probability of each dataset when interleaving.")
    val_size: float = _f(0.0, "Hold out this fraction (< 1) or count (>= 1) of the training examples for eval.")
    seed: int = _f(42, "Seed of the val_size split and of interleaving.")
    on_bad_record: Literal["error", "skip"] = _f(
        "error", "A malformed record stops the run with its location, or is skipped and counted per reason."
    )
    txt_document: Literal["line", "file"] = _f("line", ".txt files: one document per non-empty line, or per file.")
    streaming: bool = _f(False, "Read and tokenize lazily, for data larger than memory (needs train.max_steps).")
    overwrite_cache: bool = _f(False, "Rebuild the tokenized dataset even if a cache for it exists.")
    preprocessing_num_workers: int | None = _f(None, "Processes that tokenize in parallel; None: one.")


@dataclass
class FinetuningArgs:
    finetuning_type: Literal["lora", "freeze", "full"] = _f("lora", "What trains: LoRA adapters, the last layers, or all.")
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: int = _f(16, "LoRA scaling alpha (the update is scaled by alpha / rank).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input; any dropout halves CPU training speed (measured).")
    lora_target: str | list[str] = _f(
        "all", "`all`: every linear layer of the decoder blocks; module names such as [q_proj, v_proj]; "
        "or one regular expression matched against full module names."
    )
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA (peft use_dora).")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scale by alpha / sqrt(rank) (peft use_rslora).")
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora"] = _f(
        "default", "LoRA initialisation: peft's default (B = 0, A Kaiming-uniform), gaussian, or pissa / olora "
        "(from the weights' SVD / QR; the saved adapter is converted to a plain rank-2r LoRA of the original model)."
    )
    modules_to_save: list[str] | None = _f(
        None, "Modules trained in full and saved with the adapter (e.g. [lm_head] or a classifier head)."
    )
    loraplus_lr_ratio: float | None = _f(
        None, "LoRA+: the B matrices learn this many times faster than train.learning_rate (16 is common)."
    )
    adapter_name_or_path: str | list[str] | None = _f(
        None, "lora: go on training this saved adapter (a peftkit output_dir or any peft adapter folder) "
        "instead of a new one; its own LoRA settings apply. A list stacks: every adapter but the last is merged "
        "into the model, the last one trains."
    )
    pref_beta: float = _f(
        0.1, "dpo / kto: beta, how far the policy may move from the reference (higher: closer); simpo: the reward "
        "scale (2.0 is common); orpo: lambda, the weight of the odds-ratio term.")
    pref_ftx: float = _f(0.0, "dpo: weight of an SFT loss on the chosen answers added to the pair loss.")
    pref_loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = _f(
        "sigmoid", "dpo: the pair loss. sigmoid (DPO), ipo, hinge (SLiC) against a reference model; orpo and simpo "
        "need none (none is built).")
    simpo_gamma: float = _f(0.5, "simpo: the target reward margin gamma.")
    kto_desirable_weight: float = _f(1.0, "kto: weight of the desirable examples' loss.")
    kto_undesirable_weight: float = _f(1.0, "kto: weight of the undesirable examples' loss.")
    freeze_trainable_layers: int = _f(2, "freeze: how many of the last decoder layers train.")
    freeze_trainable_modules: list[str] | None = _f(
        None, "freeze: module name fragments that train instead of the last layers (e.g. [mlp])."
    )
    freeze_vision_tower: bool = _f(
        True, "Image-text models: keep the vision encoder frozen; false trains it in full (beside LoRA, or with "
        "freeze / full tuning).")
    freeze_multi_modal_projector: bool = _f(
        True, "Image-text models: keep the projector (image features to text embeddings) frozen; false trains it "
        "in full.")
    freeze_language_model: bool = _f(
        False, "Image-text models: keep the language model frozen (freeze / full tuning), so only an unfrozen "
        "vision tower or projector trains.")


# eval.metrics' names: scored by eval/metrics.py's METRICS (on generated answers), and "loss" (eval/loss.py). Named
# here so config checks them without importing eval (tests/unit/test_metrics.py keeps the two equal).
METRIC_NAMES = ("ner_json", "exact_match", "bleu", "rouge", "accuracy", "f1", "tool_call", "loss")


@dataclass
class EvalArgs:
    dataset: str | None = _f(None, "Records to predict on with generation after training (and before, see below).")
    max_samples: int | None = _f(None, "Predict on only the first N records.")
    metrics: list[str] = _f(
        ["exact_match"],
        f"Any of {', '.join(METRIC_NAMES[:-1])} (on generated answers) and loss (eval loss and perplexity, no "
        "generation).",
    )
    batch_size: int = _f(16, "Answers generated at once: rows of the engine's running batch (infer/engine.py).")
    before_training: bool | int = _f(
        False, "Also predict with the model as training starts (the base model, or the adapter of "
        "finetuning.adapter_name_or_path), to show the gain: true (the same records), or a number N "
        "(only the first N: a cheap before figure when the after-training eval is long).")


@dataclass
class GenerateArgs:
    max_new_tokens: int = _f(256, "Generation stops here or at the end-of-turn token.")
    do_sample: bool = _f(False, "Sample instead of greedy decoding.")
    temperature: float = _f(0.7, "Sampling temperature (do_sample only).")
    top_p: float = _f(0.9, "Nucleus sampling mass (do_sample only).")
    top_k: int = _f(50, "Sample among the k most likely tokens (do_sample only; 0: all; 50 is transformers' default).")
    repetition_penalty: float = _f(1.0, "Penalty > 1 discourages repeats.")
    json_mode: bool = _f(False, "Constrain answers to a JSON object (what serve's response_format json_object does).")


@dataclass
class GrpoArgs:
    """stage grpo: sampling, the loss and the reward functions (defaults as TRL's GRPOConfig where it has one)."""

    num_generations: int = _f(4, "Answers sampled per prompt; each is scored against the others of its group.")
    max_new_tokens: int = _f(128, "Longest sampled answer; one cut here gets no end-of-turn token.")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling mass.")
    top_k: int = _f(50, "Sample among the k most likely tokens (0: all); 50 as transformers' generate samples.")
    beta: float = _f(0.0, "Weight of the KL penalty to the reference (the model with its adapter disabled, or a frozen "
                          "copy); 0: no reference forward at all (TRL's default).")
    epsilon: float = _f(0.2, "Clipping of the probability ratio to [1 - epsilon, 1 + epsilon].")
    loss_type: Literal["bnpo", "grpo"] = _f(
        "bnpo", "bnpo: mean over every answer token of the batch (no length bias); grpo: mean per answer, then over "
        "answers (the paper's).")
    scale_rewards: bool = _f(True, "Divide the advantages by their group's standard deviation (false: Dr. GRPO).")
    rewards: list[Any] = _f(
        [], "Reward functions, summed with weights: built-ins ner_json_f1, exact_match, json_valid, length_penalty; "
        "`regex:PATTERN`; `package.module:function`; or {name: ..., weight: W}. See peftkit/train/rewards.py.")


@dataclass
class TrainExtras:
    """Keys peftkit reads from the `train` section besides Seq2SeqTrainingArguments' own."""

    resume_from_checkpoint: bool | str | None = _f(
        None, "true: the latest complete checkpoint in output_dir (a fresh start if there is none); "
        "a path: that checkpoint."
    )
    overwrite_output_dir: bool = _f(
        False, "Allow a fresh run into an output_dir that holds checkpoints (they are deleted first)."
    )
    early_stopping_patience: int | None = _f(
        None, "Stop after this many evaluations without improving metric_for_best_model (default eval_loss)."
    )
    early_stopping_threshold: float = _f(0.0, "The least change that counts as an improvement.")
    max_train_minutes: float | None = _f(
        None, "Train for about this long: the step count is chosen from the rate of the first steps (max_steps, "
        "or the epochs, stay the upper bound) and the learning-rate schedule fitted to it, so a faster machine "
        "trains more steps rather than finishing early. Evaluation and saving inside the run count too."
    )
    chunked_loss: bool | None = _f(
        None, "Cross-entropy over supervised tokens in chunks, never the whole batch's logits at once; "
        "None: on wherever it is exact (and train.peftkit_speedups allows)."
    )
    peftkit_speedups: Literal["auto", "on", "off"] = _f(
        "auto", "auto: peftkit's patches of peft / transformers internals for memory and speed (fused LoRA, one bf16 "
        "cast per activation, chunked loss), for the library versions they were tested against, where measured to "
        "help (the first two: CPU only); on: all of them on any device; off: none of them."
    )


@dataclass
class RunConfig:
    stage: str = _f("sft", "The training stage: one of the names in peftkit/stages.py (sft, pt, rm, dpo, kto, grpo, cls).")
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    finetuning: FinetuningArgs = field(default_factory=FinetuningArgs)
    train: dict[str, Any] = field(default_factory=dict)
    eval: EvalArgs = field(default_factory=EvalArgs)
    generate: GenerateArgs = field(default_factory=GenerateArgs)
    grpo: GrpoArgs = field(default_factory=GrpoArgs)


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "finetuning": FinetuningArgs,
    "eval": EvalArgs,
    "generate": GenerateArgs,
    "grpo": GrpoArgs,
}
