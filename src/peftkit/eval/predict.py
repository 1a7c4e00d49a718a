"""Batch prediction on held-out records: generate, score, write predictions and results."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftkit.atomic import write_json_atomic, write_text_atomic
from peftkit.config.schema import RunConfig
from peftkit.constants import PREDICT_RESULTS_FILE, PREDICTIONS_FILE
from peftkit.data.dataset import load_messages
from peftkit.data.encode import render_prompt
from peftkit.eval.generate import adapters_merged, generate_many
from peftkit.eval.loss import eval_loss
from peftkit.eval.metrics import METRICS
from peftkit.model.dtypes import autocast_dtype
from peftkit.stages import stage as stage_of

logger = logging.getLogger("peftkit")


def predict(model: Any, tokenizer: Any, cfg: RunConfig, output_dir: Path, tag: str = "") -> dict[str, Any]:
    """Score `eval.dataset` with `eval.metrics`; writes predict_results{tag}.json and returns it.

    `loss` needs no generation; every other metric scores generated answers, which are also
    written to generated_predictions{tag}.jsonl. Stages with a scorer (rm, dpo, cls) score records instead (eval/scoring.py).
    """
    metrics: dict[str, Any] = {"dataset": cfg.eval.dataset}  # which records produced these figures
    entry = stage_of(cfg.stage)
    if entry.scorer is not None:  # scored, not generated: eval.metrics does not apply
        metrics.update(entry.load("scorer")(model, tokenizer, cfg, output_dir, tag))
        write_json_atomic(output_dir / PREDICT_RESULTS_FILE.replace(".json", f"{tag}.json"), metrics)
        return metrics
    if "loss" in cfg.eval.metrics:
        metrics.update(eval_loss(model, tokenizer, cfg))
    if any(m != "loss" for m in cfg.eval.metrics):
        metrics.update(_generate_and_score(model, tokenizer, cfg, output_dir, tag))
    write_json_atomic(output_dir / PREDICT_RESULTS_FILE.replace(".json", f"{tag}.json"), metrics)
    return metrics


def _generate_and_score(model: Any, tokenizer: Any, cfg: RunConfig, output_dir: Path, tag: str) -> dict[str, Any]:
    """Generated answers scored against the references; results keep file order."""
    data_args = replace(cfg.data, max_samples=cfg.eval.max_samples)
    records = load_messages([str(cfg.eval.dataset)], data_args)
    prompts = [render_prompt(tokenizer, messages[:-1]) for messages, _ in records]
    references = [messages[-1]["content"] for messages, _ in records]
    start = time.time()
    with adapters_merged(model):
        answers = generate_many(model, tokenizer, prompts, cfg.generate, cfg.eval.batch_size,
                                dtype=autocast_dtype(cfg.train),
                                progress=lambda done, total: logger.info("predict%s: %d/%d", tag, done, total))
    seconds = time.time() - start
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
    metrics: dict[str, Any] = {}
    for name in cfg.eval.metrics:
        if name != "loss":
            metrics.update(METRICS[name](texts, references))
    metrics.update(
        records=len(records),
        predict_seconds=round(seconds, 2),
        records_per_second=round(len(records) / seconds, 3) if seconds else None,
        generated_tokens_per_second=round(sum(map(len, answers)) / seconds, 1) if seconds else None,
    )
    lines = [
        json.dumps({"prompt": tokenizer.decode(p), "predict": t, "label": r}, ensure_ascii=False)
        for p, t, r in zip(prompts, texts, references)
    ]
    write_text_atomic(output_dir / PREDICTIONS_FILE.replace(".jsonl", f"{tag}.jsonl"), "\n".join(lines) + "\n")
    return metrics
