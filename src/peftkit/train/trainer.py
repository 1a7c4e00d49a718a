"""PeftTrainer: transformers' Seq2SeqTrainer that knows what `finetuning_type` trained and saves it.

It also counts the tokens it trains on (fed, real, supervised), stops on a non-finite loss, and
marks each checkpoint complete as its very last write.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from transformers import Seq2SeqTrainer
from typing_extensions import override

from peftkit.atomic import write_json_atomic
from peftkit.config.schema import FinetuningArgs
from peftkit.constants import (
    CHECKPOINT_MARKER,
    CHECKPOINT_STATE_FILE,
    FINETUNING_ARGS_FILE,
    IGNORE_INDEX,
    TRAINING_ARGS_FILE,
)
from peftkit.errors import PeftkitError
from peftkit.model.finetuning import LORA_INIT_DIR
from peftkit.model.value_head import (
    causal_lm,
    load_value_head,
    save_value_head,
    value_head,
    without_value_head,
)
from peftkit.train.fused_lora import fused_lora_forward
from peftkit.train.loss import (
    chunked_causal_lm_loss,
    hidden_states_as_logits,
    supports_chunked_loss,
)
from peftkit.train.precision import one_cast_per_activation


def training_speedups(model: Any, autocast: bool, compiled: bool) -> ExitStack:
    """What PeftTrainer.train runs inside: LoRA's update fused into each layer's output (not under
    torch.compile) and, under autocast, one cast per activation. Both exact; the model is back as it was after."""
    stack = ExitStack()
    if not compiled:
        stack.enter_context(fused_lora_forward(model))
    if autocast:
        stack.enter_context(one_cast_per_activation(model))
    return stack


class TrainingDiverged(PeftkitError):
    """The loss became NaN or infinite."""


@dataclass
class TokenCounts:
    """Tokens trained on, over every process, since step 0 (restored on resume)."""

    tokens: int = 0  # fed to the model, padding included
    real_tokens: int = 0  # without padding
    supervised_tokens: int = 0  # with a label (the ones the loss is over)

    def add(self, other: TokenCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def count_tokens(inputs: dict[str, Any], pad_token_id: int | None) -> TokenCounts:
    ids, labels = inputs["input_ids"], inputs.get("labels")
    if "attention_mask" in inputs:
        real = int(inputs["attention_mask"].sum())
    elif "position_ids" in inputs and labels is not None:  # packed rows: padding is the unlabelled tail
        real = ids.numel() - _padding_tail(ids, labels, pad_token_id)
    else:
        real = ids.numel()
    if labels is None:
        supervised = 0
    elif labels.dim() == 1:  # cls: one class per record
        supervised = labels.numel()
    else:
        supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return TokenCounts(ids.numel(), real, supervised)


def _padding_tail(ids: Any, labels: Any, pad_token_id: int | None) -> int:
    pad = (ids == pad_token_id) & (labels == IGNORE_INDEX)
    # length of each row's run of padding at its end
    tail = pad.flip(-1).int().cumprod(-1).sum(-1)
    return int(tail.sum())


class PeftTrainer(Seq2SeqTrainer):
    """Saves, per finetuning_type, exactly what trained plus how it was trained.

    lora → adapter_model.safetensors + adapter_config.json (peft's save_pretrained);
    freeze / full → the whole model as safetensors; always the tokenizer, training_args.json and
    finetuning_args.json. transformers' own `_load_best_model` restores all three types
    correctly (tests/unit/test_trainer.py checks the restored weights), so it is not overridden.
    """

    def __init__(self, finetuning_args: FinetuningArgs, chunked_loss: bool | None = None, stage: str = "sft",
                 objective: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.finetuning_args = finetuning_args
        self.objective = objective  # rm / dpo: a loss over (chosen, rejected) pairs (train/objectives.py)
        if stage in ("rm", "dpo", "cls"):
            # means over pairs or records, not sums over tokens: Trainer then scales them for
            # gradient accumulation itself
            self.model_accepts_loss_kwargs = False
        self.chunked_loss = self._use_chunked_loss(chunked_loss)
        self.stage_metrics: dict[str, list[float]] = {}  # the objective's metrics since the last log
        self.token_counts = TokenCounts()  # this process, since it started
        self.token_base = TokenCounts()  # every process, up to the checkpoint resumed from

    @override
    def train(self, *args: Any, **kwargs: Any) -> Any:
        with training_speedups(self.model, self.args.bf16 or self.args.fp16, self.args.torch_compile):
            return super().train(*args, **kwargs)

    @override
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        head = value_head(model)
        if head is not None and not hasattr(model, "peft_config"):  # full weights stay a plain causal LM
            state_dict = without_value_head(state_dict if state_dict is not None else model.state_dict())
        super()._save(output_dir, state_dict=state_dict)
        out = Path(output_dir or self.args.output_dir)
        initial = Path(self.args.output_dir) / LORA_INIT_DIR
        if out == Path(self.args.output_dir) and initial.is_dir() and hasattr(model, "peft_config"):
            # pissa / olora: the final adapter becomes a plain LoRA of the original model (checkpoints stay
            # as trained, for resuming on the in-memory, rewritten base)
            model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(initial))
        if head is not None:
            save_value_head(model, out)
        write_json_atomic(out / TRAINING_ARGS_FILE, json.loads(self.args.to_json_string()))
        write_json_atomic(out / FINETUNING_ARGS_FILE, asdict(self.finetuning_args))

    @override
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if value_head(self.model) is not None:
            load_value_head(self.model, resume_from_checkpoint)

    @override
    def _load_best_model(self) -> None:
        super()._load_best_model()
        if value_head(self.model) is not None:
            load_value_head(self.model, self.state.best_model_checkpoint)

    @override
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        totals = self.total_token_counts()  # every process takes part in the reduction
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            write_json_atomic(folder / CHECKPOINT_STATE_FILE, asdict(totals))
            (folder / CHECKPOINT_MARKER).write_text("ok\n", encoding="utf-8")

    def restore_token_counts(self, checkpoint: Path) -> None:
        path = Path(checkpoint) / CHECKPOINT_STATE_FILE
        if path.is_file():
            self.token_base = TokenCounts(**json.loads(path.read_text(encoding="utf-8")))

    def total_token_counts(self) -> TokenCounts:
        """Counts of every process (an all-reduce when distributed: call it on every rank)."""
        local = [self.token_counts.tokens, self.token_counts.real_tokens, self.token_counts.supervised_tokens]
        if self.args.world_size > 1:
            import torch
            import torch.distributed as dist

            t = torch.tensor(local, dtype=torch.long, device=self.args.device)
            dist.all_reduce(t)
            local = t.tolist()
        total = TokenCounts(*local)
        total.add(self.token_base)
        return total

    @override
    def create_optimizer(self, model: Any = None) -> Any:
        """LoRA+ (finetuning.loraplus_lr_ratio) through peft's own optimizer builder; otherwise transformers'."""
        ratio = self.finetuning_args.loraplus_lr_ratio
        if ratio is None or self.optimizer is not None:
            return super().create_optimizer(*([model] if model is not None else []))
        from peft.optimizers import create_loraplus_optimizer

        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = create_loraplus_optimizer(
            self.model, optimizer_cls, lr=self.args.learning_rate, loraplus_lr_ratio=ratio,
            loraplus_weight_decay=self.args.weight_decay, **optimizer_kwargs,
        )
        return self.optimizer

    def _use_chunked_loss(self, requested: bool | None) -> bool:
        """On by default where it is exact; never with a label smoother or a custom loss."""
        causal_lm = self._causal_lm()
        possible = (self.objective is None and supports_chunked_loss(causal_lm) and self.label_smoother is None
                    and self.compute_loss_func is None
                    and (self.args.world_size == 1 or not causal_lm.get_output_embeddings().weight.requires_grad))
        if requested and not possible:
            raise PeftkitError("train.chunked_loss=true: not exact for this model or setup (a scaled or soft-capped "
                               "output layer, a label smoother, a trained output layer across processes, or a stage "
                               "whose loss is not next-token cross-entropy: rm, dpo, cls)")
        return possible if requested is None else bool(requested)

    def _causal_lm(self) -> Any:
        return causal_lm(self.accelerator.unwrap_model(self.model))

    @override
    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.objective is not None:
            loss, metrics, pair_scores = self.objective(model, inputs)
            if model.training:
                for k, v in metrics.items():
                    self.stage_metrics.setdefault(k, []).append(v)
            return (loss, {"pair_scores": pair_scores}) if return_outputs else loss
        if not (self.chunked_loss and model.training and not return_outputs and "labels" in inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        with hidden_states_as_logits(self._causal_lm()) as head:
            hidden = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        total, count = chunked_causal_lm_loss(hidden, labels, head)
        loss = total / (num_items_in_batch if num_items_in_batch is not None else max(count, 1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
        return loss

    @override
    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        self.token_counts.add(count_tokens(inputs, getattr(self.processing_class, "pad_token_id", None)))
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = float(loss)
        if not math.isfinite(value):
            from peftkit.train.checkpoints import latest_complete

            last = latest_complete(Path(self.args.output_dir))
            raise TrainingDiverged(
                f"the loss is {value} at step {self.state.global_step + 1}: training stopped. "
                + (f"The last good checkpoint is {last}. " if last else "No checkpoint was saved. ")
                + "Lower train.learning_rate, check the data (data_report.json), or use bf16 instead of fp16."
            )
        return loss

    @override
    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None, **kwargs: Any) -> Any:
        """rm / dpo: the eval loss and each pair's (chosen, rejected) scores, for pair_eval_metrics."""
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
        if self.model.training or "train_runtime" in logs or "loss" in logs:
            logs.update({f"{k}_seen": v for k, v in asdict(self.total_token_counts()).items()})
        if self.stage_metrics and "loss" in logs:  # averaged over the steps since the last log
            logs.update({k: round(sum(v) / len(v), 6) for k, v in self.stage_metrics.items()})
            self.stage_metrics.clear()
        if self.objective is not None:  # trainer_log.jsonl's `reward`: the mean reward margin
            margin = self.objective.names["margin"]
            for key in (margin, f"eval_{margin}"):
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
