"""PeftTrainer: transformers' Seq2SeqTrainer that saves what `finetuning_type` trained and runs the stage's loss.

Token counts, the divergence check and checkpoint completion markers are a callback (train/progress.py);
the speed patches are train/speedups.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import Seq2SeqTrainer
from typing_extensions import override

from peftkit.atomic import write_json_atomic
from peftkit.config.schema import FinetuningArgs
from peftkit.constants import FINETUNING_ARGS_FILE, IGNORE_INDEX, TRAINING_ARGS_FILE
from peftkit.errors import PeftkitError
from peftkit.libraries import warn_untested
from peftkit.model.finetuning import LORA_INIT_DIR
from peftkit.model.heads import sums_tokens
from peftkit.model.value_head import (
    causal_lm,
    load_value_head,
    save_value_head,
    value_head,
    without_value_head,
)
from peftkit.train.loss import chunked_lm_loss, supports_chunked_loss
from peftkit.train.progress import Progress
from peftkit.train.speedups import speedups_enabled, training_speedups


class PeftTrainer(Seq2SeqTrainer):
    """Saves, per finetuning_type, exactly what trained plus how it was trained; runs the stage's loss.

    lora → adapter_model.safetensors + adapter_config.json (peft's save_pretrained);
    freeze / full → the whole model as safetensors; always the tokenizer, training_args.json and
    finetuning_args.json. Each override says why transformers' own behaviour is not enough.
    """

    objective: Any  # the stage's loss over (chosen, rejected) pairs (objectives/, train/grpo.py); None: the model's own

    def __init__(self, finetuning_args: FinetuningArgs, progress: Progress, chunked_loss: bool | None = None,
                 stage: str = "sft", objective: Any = None, speedups: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.finetuning_args = finetuning_args
        self.progress = progress  # token counts and the divergence check (train/progress.py)
        self.objective = objective
        self.speedups = speedups
        if not sums_tokens(stage):
            # means over pairs or records, not sums over tokens: Trainer then scales them for
            # gradient accumulation itself
            self.model_accepts_loss_kwargs = False
        self.chunked_loss = self._use_chunked_loss(chunked_loss)
        self.stage_metrics: dict[str, list[float]] = {}  # the objective's metrics since the last log

    @override
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Inside train.peftkit_speedups (train/speedups.py): patches that exist only while training runs."""
        autocast = "bfloat16" if self.args.bf16 else "float16" if self.args.fp16 else None
        with training_speedups(self.model, self.speedups, autocast, self.args.torch_compile):
            return super().train(*args, **kwargs)

    @override
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer saves the model; peftkit adds the value head, pissa / olora's conversion and the args files."""
        model = self.accelerator.unwrap_model(self.model)
        head = value_head(model)
        if head is not None and not hasattr(model, "peft_config"):  # full weights stay a plain causal LM
            state_dict = without_value_head(state_dict if state_dict is not None else model.state_dict())
        super()._save(output_dir, state_dict=state_dict)
        run_dir = Path(str(self.args.output_dir))
        out = Path(output_dir) if output_dir else run_dir
        initial = run_dir / LORA_INIT_DIR
        if out == run_dir and initial.is_dir() and hasattr(model, "peft_config"):
            # pissa / olora: the final adapter becomes a plain LoRA of the original model (checkpoints stay
            # as trained, for resuming on the in-memory, rewritten base)
            model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(initial))
        if head is not None:
            save_value_head(model, out)
        write_json_atomic(out / TRAINING_ARGS_FILE, json.loads(self.args.to_json_string()))
        write_json_atomic(out / FINETUNING_ARGS_FILE, asdict(self.finetuning_args))

    @override
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """The value head is saved beside the adapter (not in it), so Trainer does not restore it."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if value_head(self.model) is not None:
            load_value_head(self.model, resume_from_checkpoint)

    @override
    def _load_best_model(self) -> None:
        """Trainer restores lora / freeze / full weights correctly (tests/unit/test_trainer.py); the value head again not."""
        super()._load_best_model()
        if value_head(self.model) is not None:
            load_value_head(self.model, str(self.state.best_model_checkpoint))

    @override
    def create_optimizer(self, model: Any = None) -> Any:
        """LoRA+ (finetuning.loraplus_lr_ratio) through peft's own optimizer builder; otherwise transformers'."""
        ratio = self.finetuning_args.loraplus_lr_ratio
        if ratio is None or self.optimizer is not None:
            return super().create_optimizer(*([model] if model is not None else []))
        from peft.optimizers import create_loraplus_optimizer

        peft_model: Any = self.model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, peft_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = create_loraplus_optimizer(
            peft_model, optimizer_cls, lr=self.args.learning_rate, loraplus_lr_ratio=ratio,
            loraplus_weight_decay=self.args.weight_decay, **optimizer_kwargs,
        )
        return self.optimizer

    def _use_chunked_loss(self, requested: bool | None) -> bool:
        """By default on where it is exact and train.peftkit_speedups allows; never with a label smoother, a custom
        loss or Liger's kernels (their fused linear cross-entropy does the same)."""
        lm = causal_lm(self.accelerator.unwrap_model(self.model))
        possible = (self.objective is None and supports_chunked_loss(lm) and self.label_smoother is None
                    and self.compute_loss_func is None and not self.args.use_liger_kernel
                    and (self.args.world_size == 1 or not lm.get_output_embeddings().weight.requires_grad))
        if requested and not possible:
            raise PeftkitError("train.chunked_loss=true: not exact for this model or setup (a scaled or soft-capped "
                               "output layer, a label smoother, a trained output layer across processes, a stage "
                               "whose loss is not next-token cross-entropy: rm, dpo, cls) or not needed (train."
                               "use_liger_kernel: Liger's fused linear cross-entropy never builds the logits either)")
        if requested:  # honoured as set, and said where the output layer's pass-through was not tested
            warn_untested("train.chunked_loss: true", ("transformers",), "; honoured as set")
        return possible and speedups_enabled(self.speedups) if requested is None else bool(requested)

    @override
    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Trainer's loss is the model's: full-vocabulary logits of the whole batch, and no pair objectives."""
        if self.objective is not None:
            loss, metrics, pair_scores = self.objective(model, inputs)
            if model.training:
                for k, v in metrics.items():
                    self.stage_metrics.setdefault(k, []).append(v)
            return (loss, {"pair_scores": pair_scores}) if return_outputs else loss
        if not (self.chunked_loss and model.training and not return_outputs and "labels" in inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        total, count = chunked_lm_loss(model, causal_lm(self.accelerator.unwrap_model(model)),
                                       {k: v for k, v in inputs.items() if k != "labels"}, inputs["labels"])
        loss = total / (num_items_in_batch if num_items_in_batch is not None else max(count, 1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
        return loss

    @override
    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        """Trainer sees neither the tokens of a packed batch nor a NaN loss (it filters it from the logs)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.progress.observe(inputs, loss, self.state.global_step + 1)
        return loss

    @override
    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None, **kwargs: Any) -> Any:
        """Stages with an objective: the eval loss and its scores of each pair or example, for its summary."""
        if self.objective is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **kwargs)
        import torch

        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, _, pair_scores = self.objective(model, inputs)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), pair_scores.detach(), torch.zeros(len(pair_scores), device=pair_scores.device)

    @override
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the token counts and the objective's metrics, so trainer_state.json and trainer_log.jsonl both have them."""
        if getattr(self.model, "training", False) or "train_runtime" in logs or "loss" in logs:
            logs.update(self.progress.log_values(self.args))
        if self.stage_metrics and "loss" in logs:  # averaged over the steps since the last log
            logs.update({k: round(sum(v) / len(v), 6) for k, v in self.stage_metrics.items()})
            self.stage_metrics.clear()
        if self.objective is not None:  # trainer_log.jsonl's `reward`: the objective's reward (a mean margin or reward)
            reward = self.objective.reward_key
            for key in (reward, f"eval_{reward}"):
                if key in logs:
                    logs["reward"] = logs[key]
        super().log(logs, start_time)


def preprocess_logits_for_accuracy(logits: Any, labels: Any) -> Any:
    """Keep only the argmax during evaluation: the full logits of an eval set need not stay in memory."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(-1)


def token_accuracy(eval_pred: Any) -> dict[str, float]:
    """Share of supervised tokens predicted exactly (next-token argmax, labels shifted as the loss does)."""
    import numpy as np

    preds, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
    preds, labels = preds[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return {"accuracy": round(float((preds[mask] == labels[mask]).mean()) if mask.any() else 0.0, 6)}


def class_metrics(eval_pred: Any) -> dict[str, float]:
    """cls: accuracy and F1 of the predicted classes (argmax kept by preprocess_logits_for_accuracy)."""
    from peftkit.eval.metrics import classification_scores

    return classification_scores(list(eval_pred.predictions), list(eval_pred.label_ids))
