"""`peftkit train`: config → tokenizer → data → model → trainer → train → save → predict. Read top to bottom."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.atomic import write_json_atomic
from peftkit.config import RunConfig, build_training_arguments, dump_config
from peftkit.constants import CONFIG_FILE, DATA_REPORT_FILE
from peftkit.data import apply_template, build_collator, prepare_data
from peftkit.eval.predict import predict
from peftkit.model import load_model, load_tokenizer, prepare_for_training
from peftkit.train.callbacks import LogCallback
from peftkit.train.plot import plot_loss
from peftkit.train.trainer import PeftTrainer

logger = logging.getLogger("peftkit")


@dataclass
class TrainResult:
    """What a run produced: its summary (also in run_summary.json) and the trained in-memory model."""

    summary: dict[str, Any]
    model: Any


def train(cfg: RunConfig) -> TrainResult:
    """Fine-tune as configured; the summary holds output_dir, losses, metrics before/after, wall time."""
    start = time.time()
    output_dir = Path(cfg.train["output_dir"])
    dump_config(cfg, output_dir / CONFIG_FILE)

    tokenizer = load_tokenizer(cfg.model)
    apply_template(tokenizer, cfg.data.template)
    data = prepare_data(cfg.data, tokenizer)
    write_json_atomic(output_dir / DATA_REPORT_FILE, data.report.as_dict())
    logger.info("data:\n%s\nexample (supervised spans in [[...]]):\n%s", data.report.summary(), data.report.example)

    model = load_model(cfg.model)
    summary: dict[str, Any] = {"output_dir": str(output_dir)}
    if cfg.eval.dataset and cfg.eval.before_training:
        summary["metrics_before"] = predict(model, tokenizer, cfg, output_dir, tag="_before")
    model = prepare_for_training(model, cfg.finetuning)

    trainer = build_trainer(cfg, model, tokenizer, data.train, data.eval)
    result = trainer.train(resume_from_checkpoint=cfg.train.get("resume_from_checkpoint"))
    trainer.save_model()
    trainer.save_state()
    if plot_loss(output_dir) is None:
        logger.info("no training_loss.png: no loss was logged (train.logging_steps is larger than the steps run)")
    # accelerate wrapped forward() in autocast for bf16/fp16; hand back the plain model, so what
    # callers compute matches a reload of the saved folder (generation applies its own autocast).
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    summary["train_loss"] = result.training_loss
    summary["train_seconds"] = round(result.metrics["train_runtime"], 1)

    if cfg.eval.dataset:
        summary["metrics_after"] = predict(model, tokenizer, cfg, output_dir)
    summary["wall_seconds"] = round(time.time() - start, 1)
    write_json_atomic(output_dir / "run_summary.json", summary)
    return TrainResult(summary, model)


def build_trainer(cfg: RunConfig, model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any) -> PeftTrainer:
    """The PeftTrainer with the collator for data.packing and the LogCallback."""
    return PeftTrainer(
        finetuning_args=cfg.finetuning,
        model=model,
        args=build_training_arguments(cfg.train),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=build_collator(tokenizer, cfg.data.packing),
        processing_class=tokenizer,
        callbacks=[LogCallback()],
    )
