"""Evaluation without generation for the stages that score: rm / dpo pairs and cls records.

Each writes one line per record (scores or the predicted class) next to the metrics, so a user
can look at the pairs the model gets wrong.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftkit.atomic import write_text_atomic
from peftkit.config.schema import RunConfig
from peftkit.data.collate import build_collator
from peftkit.data.dataset import build_dataset, file_specs, iter_samples
from peftkit.eval.metrics import classification_scores

logger = logging.getLogger("peftkit")
PAIR_SCORES_FILE = "pair_scores{tag}.jsonl"
CLASS_PREDICTIONS_FILE = "class_predictions{tag}.jsonl"


def _batches(model: Any, tokenizer: Any, cfg: RunConfig, classes: list[str] | None = None) -> Any:
    import torch

    data_args = replace(cfg.data, max_samples=cfg.eval.max_samples)
    dataset, _ = build_dataset([cfg.eval.dataset], data_args, tokenizer, cfg.stage, classes)
    collate = build_collator(tokenizer, packing=False, stage=cfg.stage)
    device = next(model.parameters()).device
    for start in range(0, len(dataset), cfg.eval.batch_size):
        rows = [dataset[i] for i in range(start, min(start + cfg.eval.batch_size, len(dataset)))]
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(rows).items()}


def score_pairs(model: Any, tokenizer: Any, cfg: RunConfig, output_dir: Path, tag: str = "") -> dict[str, Any]:
    """rm: each pair's chosen / rejected score; dpo: its implicit rewards β·log(π/π_ref). Plus accuracy and margin."""
    import torch

    from peftkit.model import load_model
    from peftkit.train.objectives import DirectPreference, PairwiseReward, pair_metrics

    if cfg.stage == "rm":
        objective: Any = PairwiseReward()
    else:  # the reference: the adapter disabled, or the base model as configured
        reference = None if hasattr(model, "disable_adapter") else load_model(cfg.model).to(next(model.parameters()).device)
        objective = DirectPreference(cfg.finetuning.pref_beta, 0.0, reference)
    model.eval()
    pairs, losses = [], []
    with torch.inference_mode():
        for batch in _batches(model, tokenizer, cfg):
            loss, _, scores = objective(model, batch)
            pairs.append(scores.float().cpu())
            losses += [float(loss)] * len(scores)
    both = torch.cat(pairs)
    metrics: dict[str, Any] = {k: round(v, 6) for k, v in pair_metrics(both[:, 0], both[:, 1], objective.names).items()}
    metrics.update(eval_loss=round(sum(losses) / len(losses), 6), records=len(both))
    lines = [json.dumps({"record": i, "chosen": round(float(c), 6), "rejected": round(float(r), 6),
                         "correct": bool(c > r)}) for i, (c, r) in enumerate(both.tolist())]
    write_text_atomic(output_dir / PAIR_SCORES_FILE.format(tag=tag), "\n".join(lines) + "\n")
    return metrics


def classify(model: Any, tokenizer: Any, cfg: RunConfig, output_dir: Path, tag: str = "") -> dict[str, Any]:
    """cls: the predicted class and its probabilities per record; accuracy and F1."""
    import torch

    config = model.config
    classes = [config.id2label[i] for i in range(config.num_labels)]
    model.eval()
    preds, labels, probs = [], [], []
    with torch.inference_mode():
        for batch in _batches(model, tokenizer, cfg, classes):
            out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float().softmax(-1)
            preds += out.argmax(-1).tolist()
            probs += out.tolist()
            labels += batch["labels"].tolist()
    metrics: dict[str, Any] = {**classification_scores(preds, labels), "records": len(preds)}
    data_args = replace(cfg.data, max_samples=cfg.eval.max_samples)
    samples = [s for spec in file_specs([cfg.eval.dataset], data_args) for s, _ in iter_samples(spec, data_args)]
    lines = [json.dumps({"text": s["text"], "text_pair": s["text_pair"], "label": classes[y], "predict": classes[p],
                         "probabilities": [round(x, 4) for x in pr]}, ensure_ascii=False)
             for s, y, p, pr in zip(samples, labels, preds, probs)]
    write_text_atomic(output_dir / CLASS_PREDICTIONS_FILE.format(tag=tag), "\n".join(lines) + "\n")
    return metrics
