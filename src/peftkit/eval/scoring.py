"""Evaluation without generation for the stages that score: rm / dpo pairs, kto examples and cls records.

Each writes one line per record, with its location in the file, next to the metrics, so a user
can look at the pairs or records the model gets wrong.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftkit.atomic import write_text_atomic
from peftkit.config.schema import RunConfig
from peftkit.data.collate import build_collator
from peftkit.data.dataset import encode_records
from peftkit.data.formats import Sample
from peftkit.eval.metrics import classification_scores

logger = logging.getLogger("peftkit")
PAIR_SCORES_FILE = "pair_scores{tag}.jsonl"
CLASS_PREDICTIONS_FILE = "class_predictions{tag}.jsonl"


def _batches(model: Any, tokenizer: Any, cfg: RunConfig,
             classes: list[str] | None = None) -> Iterator[tuple[list[tuple[Sample, str]], dict[str, Any]]]:
    """(records, batch) over eval.dataset; a record whose example was dropped is skipped and counted in the log."""
    import torch

    data_args = replace(cfg.data, max_samples=cfg.eval.max_samples)
    records = encode_records([str(cfg.eval.dataset)], data_args, tokenizer, cfg.stage, classes)
    kept = [(sample, where, ex) for sample, where, ex in records if not ex.drop]
    if len(kept) < len(records):
        first = next(r for r in records if r[2].drop)
        logger.warning("%s: %d of %d records not scored (first: %s, %s)", cfg.eval.dataset, len(records) - len(kept),
                       len(records), first[1], first[2].drop)
    collate = build_collator(tokenizer, packing=False, stage=cfg.stage)
    device = next(model.parameters()).device
    for start in range(0, len(kept), cfg.eval.batch_size):
        part = kept[start : start + cfg.eval.batch_size]
        rows = [{"input_ids": ex.input_ids, "labels": ex.labels, **ex.extra} for _, _, ex in part]
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(rows).items()}
        yield [(sample, where) for sample, where, _ in part], batch


def _objective_scores(model: Any, tokenizer: Any, cfg: RunConfig) -> tuple[Any, Any, list[float], list[str]]:
    """The stage's objective (without an SFT term) over eval.dataset: it, the scores and loss of each pair or
    example, and their records' locations. A reference model, where one is needed, is the base model as configured."""
    import torch

    from peftkit.model import load_model
    from peftkit.objectives.build import build_objective

    without_sft = replace(cfg, finetuning=replace(cfg.finetuning, pref_ftx=0.0))
    objective = build_objective(cfg.stage, model, without_sft,
                                reference=lambda: load_model(cfg.model).to(next(model.parameters()).device),
                                tokenizer=tokenizer)
    assert objective is not None, f"stage {cfg.stage} scores pairs or examples, so it has an objective"
    model.eval()
    parts, losses, wheres = [], [], []
    with torch.inference_mode():
        for records, batch in _batches(model, tokenizer, cfg):
            loss, _, scores = objective(model, batch)
            parts.append(scores.float().cpu())
            losses += [float(loss)] * len(scores)
            wheres += [where for _, where in records]
    return objective, torch.cat(parts), losses, wheres


def score_pairs(model: Any, tokenizer: Any, cfg: RunConfig, output_dir: Path, tag: str = "") -> dict[str, Any]:
    """rm: each pair's chosen / rejected score; dpo: its implicit rewards (per pref_loss). Plus accuracy and margin."""
    objective, both, losses, wheres = _objective_scores(model, tokenizer, cfg)
    metrics: dict[str, Any] = {k: round(v, 6) for k, v in objective.summary(both).items()}
    metrics.update(eval_loss=round(sum(losses) / len(losses), 6), records=len(both))
    lines = [json.dumps({"record": where, "chosen": round(c, 6), "rejected": round(r, 6), "correct": c > r},
                        ensure_ascii=False) for where, (c, r) in zip(wheres, both.tolist())]
    write_text_atomic(output_dir / PAIR_SCORES_FILE.format(tag=tag), "\n".join(lines) + "\n")
    return metrics


def score_judged(model: Any, tokenizer: Any, cfg: RunConfig, output_dir: Path, tag: str = "") -> dict[str, Any]:
    """kto: each example's implicit reward β·log(π/π_ref), the mean of the desirable and of the undesirable ones;
    where eval.dataset holds preference pairs (both answers of one prompt), also the pair accuracy and margin
    exactly as dpo reports them, so kto and dpo runs compare on the same held-out pairs."""
    from peftkit.objectives.pairs import DirectPreference, pair_metrics

    objective, scores, losses, wheres = _objective_scores(model, tokenizer, cfg)
    metrics: dict[str, Any] = {k: round(v, 6) for k, v in objective.summary(scores).items()}
    by_record: dict[str, dict[int, float]] = {}
    for where, (reward, desirable) in zip(wheres, scores.tolist()):
        by_record.setdefault(where, {})[int(desirable)] = reward
    pairs = [(r[1], r[0]) for r in by_record.values() if len(r) == 2]
    if pairs:
        import torch

        both = torch.tensor(pairs)
        metrics.update({k: round(v, 6) for k, v in pair_metrics(both[:, 0], both[:, 1], DirectPreference.names).items()})
        metrics["pairs"] = len(pairs)
    metrics.update(eval_loss=round(sum(losses) / len(losses), 6), records=len(by_record), examples=len(scores))
    lines = [json.dumps({"record": where, **({"chosen": round(r[1], 6), "rejected": round(r[0], 6), "correct": r[1] > r[0]}
                                             if len(r) == 2 else {"desirable": bool(next(iter(r))),
                                                                  "reward": round(next(iter(r.values())), 6)})},
                        ensure_ascii=False) for where, r in by_record.items()]
    write_text_atomic(output_dir / PAIR_SCORES_FILE.format(tag=tag), "\n".join(lines) + "\n")
    return metrics


def classify(model: Any, tokenizer: Any, cfg: RunConfig, output_dir: Path, tag: str = "") -> dict[str, Any]:
    """cls: the predicted class and its probabilities per record; accuracy and F1."""
    import torch

    classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
    model.eval()
    preds, labels, lines = [], [], []
    with torch.inference_mode():
        for records, batch in _batches(model, tokenizer, cfg, classes):
            out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float().softmax(-1)
            for (sample, where), y, p in zip(records, batch["labels"].tolist(), out.tolist()):
                predicted = max(range(len(p)), key=p.__getitem__)
                preds.append(predicted)
                labels.append(y)
                lines.append(json.dumps({"record": where, "text": sample["text"], "text_pair": sample["text_pair"],
                                         "label": classes[y], "predict": classes[predicted],
                                         "probabilities": [round(x, 4) for x in p]}, ensure_ascii=False))
    write_text_atomic(output_dir / CLASS_PREDICTIONS_FILE.format(tag=tag), "\n".join(lines) + "\n")
    return {**classification_scores(preds, labels), "records": len(preds)}
