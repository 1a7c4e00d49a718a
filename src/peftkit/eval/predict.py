"""Batch prediction on held-out records: generate, score, write predictions and results."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from peftkit.atomic import write_json_atomic, write_text_atomic
from peftkit.config.schema import RunConfig
from peftkit.constants import PREDICT_RESULTS_FILE, PREDICTIONS_FILE
from peftkit.data.dataset import load_messages
from peftkit.errors import PeftkitError
from peftkit.eval.loss import eval_loss
from peftkit.eval.metrics import METRICS, reference_text
from peftkit.infer.engine import generate_batch
from peftkit.infer.merging import adapters_merged
from peftkit.model.dtypes import autocast_dtype
from peftkit.stages import stage as stage_of

logger = logging.getLogger("peftkit")


# Another engine's generation (eval --engine vllm): the prompts' answers as token ids, in order.
Generator = Callable[[list[list[int]]], list[list[int]]]


def needs_the_model(cfg: RunConfig) -> str | None:
    """What in this eval another engine's answers cannot give (None: answers are all it needs)."""
    entry = stage_of(cfg.stage)
    if entry.scorer is not None:
        return f"stage {entry.name} scores records with the model itself"
    if "loss" in cfg.eval.metrics:
        return "eval.metrics loss needs the model's forward"
    if cfg.generate.json_mode:
        return "generate.json_mode is peftkit's constrained decoding"
    return None


def predict(model: Any, tokenizer: Any, cfg: RunConfig, output_dir: Path, tag: str = "",
            generator: Generator | None = None) -> dict[str, Any]:
    """Score `eval.dataset` with `eval.metrics`; writes predict_results{tag}.json and returns it.

    `loss` needs no generation; every other metric scores generated answers, which are also
    written to generated_predictions{tag}.jsonl. Stages with a scorer (rm, dpo, cls) score records instead (eval/scoring.py).
    With `generator` (model None) the answers come from it, and only generated metrics can be asked for.
    """
    metrics: dict[str, Any] = {"dataset": cfg.eval.dataset}  # which records produced these figures
    entry = stage_of(cfg.stage)
    if generator is not None and needs_the_model(cfg):
        raise PeftkitError(f"--engine vllm generates answers only: {needs_the_model(cfg)}; use --engine peftkit")
    if entry.scorer is not None:  # scored, not generated: eval.metrics does not apply
        metrics.update(entry.load("scorer")(model, tokenizer, cfg, output_dir, tag))
        write_json_atomic(output_dir / PREDICT_RESULTS_FILE.replace(".json", f"{tag}.json"), metrics)
        return metrics
    if "loss" in cfg.eval.metrics:
        metrics.update(eval_loss(model, tokenizer, cfg))
    if any(m != "loss" for m in cfg.eval.metrics):
        metrics.update(_generate_and_score(model, tokenizer, cfg, output_dir, tag, generator))
    write_json_atomic(output_dir / PREDICT_RESULTS_FILE.replace(".json", f"{tag}.json"), metrics)
    return metrics


def _generate_and_score(model: Any, tokenizer: Any, cfg: RunConfig, output_dir: Path, tag: str,
                        generator: Generator | None) -> dict[str, Any]:
    """Generated answers scored against the references; results keep file order.

    Each answer is appended to a partial file as it finishes; a killed eval started again with the same
    records and settings generates only the answers that are missing (`_resumed`)."""
    data_args = replace(cfg.data, max_samples=cfg.eval.max_samples)
    records = load_messages([str(cfg.eval.dataset)], data_args)
    prompts, pixels = _prompts(tokenizer, cfg, records)
    references = [reference_text(r.messages[-1]) for r in records]
    final = output_dir / PREDICTIONS_FILE.replace(".jsonl", f"{tag}.jsonl")
    partial = final.with_name(f".{final.name}.partial")
    shown = [r.images for r in records] if pixels else []  # an image changed means other prompts
    fingerprint = hashlib.sha256(json.dumps([prompts, asdict(cfg.generate), shown]).encode()).hexdigest()
    answers: dict[int, list[int]] = _resumed(partial, fingerprint)
    todo = [i for i in range(len(prompts)) if i not in answers]
    if answers:
        logger.info("predict%s: %d of %d answers kept from an interrupted eval (%s)", tag, len(answers), len(prompts), partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    meter = _Meter(tag, len(prompts), len(answers))
    start = time.time()
    with partial.open("a" if answers else "w", encoding="utf-8") as out:
        if not answers:
            out.write(json.dumps({"fingerprint": fingerprint}) + "\n")

        def done(k: int, tokens: list[int]) -> None:
            answers[todo[k]] = tokens
            out.write(json.dumps({"index": todo[k], "tokens": tokens}) + "\n")
            out.flush()
            meter.update(len(tokens))

        if todo and generator is not None:
            if pixels:
                raise PeftkitError(f"eval.dataset={cfg.eval.dataset}: records with images are evaluated by "
                                   "peftkit's engine here, not through --engine vllm")
            for k, tokens in enumerate(generator([prompts[i] for i in todo])):
                done(k, tokens)
        elif todo:
            with adapters_merged(model):
                generate_batch(model, tokenizer, [prompts[i] for i in todo], cfg.generate, autocast_dtype(cfg.train),
                               slots=cfg.eval.batch_size, on_done=lambda k, job: done(k, job.tokens),
                               pixels=[pixels[i] for i in todo] if pixels else None)
    seconds = time.time() - start
    ordered = [answers[i] for i in range(len(prompts))]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in ordered]
    metrics: dict[str, Any] = {}
    for name in cfg.eval.metrics:
        if name != "loss":
            metrics.update(METRICS[name](texts, references))
    generated = sum(len(answers[i]) for i in todo)
    metrics.update(
        records=len(records),
        predict_seconds=round(seconds, 2),
        records_per_second=round(len(todo) / seconds, 3) if seconds and todo else None,
        generated_tokens_per_second=round(generated / seconds, 1) if seconds and todo else None,
    )
    lines = [
        json.dumps({"prompt": tokenizer.decode(p), "predict": t, "label": r}, ensure_ascii=False)
        for p, t, r in zip(prompts, texts, references)
    ]
    write_text_atomic(final, "\n".join(lines) + "\n")
    partial.unlink(missing_ok=True)
    return metrics


def _prompts(tokenizer: Any, cfg: RunConfig, records: list[Any]) -> tuple[list[list[int]], list[Any]]:
    """Each record's prompt as training renders it (an image-text model's through its processor), and the image
    records' pixel inputs ([] when no record has images)."""
    from peftkit.data.render import model_prompt
    from peftkit.errors import ConfigError
    from peftkit.model.loading import load_processor

    processor = load_processor(cfg.model)
    try:
        built = [model_prompt(tokenizer, processor, r.messages[:-1], r.images, r.tools) for r in records]
    except ConfigError as e:
        raise ConfigError([f"eval.dataset={cfg.eval.dataset}: {issue}" for issue in e.issues]) from None
    pixels = [px for _, px in built]
    return [ids for ids, _ in built], pixels if any(pixels) else []


def _resumed(partial: Path, fingerprint: str) -> dict[int, list[int]]:
    """Answers of an interrupted eval of the same prompts and settings; a torn last line is ignored.
    A partial file of other prompts or settings is started over."""
    try:
        lines = partial.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    answers: dict[int, list[int]] = {}
    try:
        if not lines or json.loads(lines[0]).get("fingerprint") != fingerprint:
            return {}
    except json.JSONDecodeError:
        return {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
            answers[int(row["index"])] = [int(t) for t in row["tokens"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            break  # the line a kill cut short, and nothing can follow it
    return answers


class _Meter:
    """Progress in the log: answers done of all, tokens/s, ETA; at most every 10 s, and at the end."""

    def __init__(self, tag: str, total: int, done: int) -> None:
        self.tag, self.total, self.done, self.resumed = tag, total, done, done
        self.tokens, self.started, self.shown = 0, time.time(), 0.0

    def update(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        now = time.time()
        if now - self.shown < 10 and self.done < self.total:
            return
        self.shown = now
        elapsed = now - self.started
        rate = (self.done - self.resumed) / elapsed if elapsed else 0.0
        eta = (self.total - self.done) / rate if rate else 0.0
        bar = "#" * int(20 * self.done / self.total)
        logger.info("predict%s: [%-20s] %d/%d  %.1f answers/s  %.0f tokens/s  ETA %ds", self.tag, bar, self.done,
                    self.total, rate, self.tokens / elapsed if elapsed else 0.0, eta)
