"""Eval loss and perplexity over the supervised tokens of held-out records, without generation."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from peftkit.config.schema import RunConfig
from peftkit.constants import IGNORE_INDEX
from peftkit.data.collate import build_collator
from peftkit.data.dataset import build_dataset


def eval_loss(model: Any, tokenizer: Any, cfg: RunConfig) -> dict[str, float]:
    """Token-weighted mean loss over every supervised token (not a mean of batch means), and its exp."""
    import torch

    from peftkit.model.loading import load_processor

    data_args = replace(cfg.data, max_samples=cfg.eval.max_samples)
    processor = load_processor(cfg.model)  # an image-text model's: records with images as training reads them
    dataset, _ = build_dataset([str(cfg.eval.dataset)], data_args, tokenizer, processor=processor)
    collate = build_collator(tokenizer, packing=False, stage=cfg.stage, processor=processor)  # as training builds them
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(dataset), cfg.eval.batch_size):
            rows = [dataset[i] for i in range(start, min(start + cfg.eval.batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            inputs = {k: v for k, v in batch.items() if k != "labels"}  # pixel inputs too, for records with images
            logits = model(**inputs, use_cache=False).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += float(losses)
            count += int((labels != IGNORE_INDEX).sum())
    loss = total / count if count else float("nan")
    return {"eval_loss": round(loss, 6), "perplexity": round(math.exp(loss), 4) if count else float("nan")}
