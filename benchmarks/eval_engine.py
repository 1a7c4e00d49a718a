"""Batched generation for `peftkit eval`: the engine (continuous batching, infer/engine.py) against the
static batches of `model.generate` peftkit used before, side by side in one run on the same records.

    .venv/bin/python benchmarks/eval_engine.py RUN_DIR [--records 463] [--slots 64 128] [--legacy-batch 64]
    .venv/bin/python benchmarks/eval_engine.py RUN_DIR --records 100 --slots 64 --legacy-batch 0 --bf16  # agreement

RUN_DIR is a finished LoRA run of examples/resume_ner_lora.yaml (the demo adapter). Both paths get the
adapter merged in memory (as eval does), greedy decoding, the config's max_new_tokens; the table gives
records/s, generated tokens/s, entity F1 and how many answers are token-identical to the legacy path.
`--bf16` adds the engine under bf16 autocast (what eval runs with train.bf16) and how many of its answers are
token-identical to the fp32 engine's: the bf16 agreement rate.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def legacy(model: Any, tokenizer: Any, prompts: list[list[int]], max_new: int, batch_size: int) -> list[list[int]]:
    """peftkit's generation before the engine (eval/generate.py at de18ae3): left-padded static batches of
    `model.generate` sorted by prompt length, in two rounds (half the budget, then the answers still going)."""
    import torch

    from peftkit.data.template import stop_token_ids

    stops = set(stop_token_ids(tokenizer)) | {tokenizer.pad_token_id}
    answers: list[list[int]] = [[] for _ in prompts]
    first = max(1, max_new // 2)
    pending = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for budget in (first, max_new - first):
        going = []
        for b in range(0, len(pending), batch_size):
            batch = pending[b : b + batch_size]
            rows = [prompts[i] + answers[i] for i in batch]
            width = max(map(len, rows))
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                                     temperature=None, top_p=None, top_k=None, eos_token_id=list(stops - {None}),
                                     pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(batch, out[:, width:].tolist()):
                end = next((k for k, t in enumerate(row) if t in stops), None)
                answers[i] += row if end is None else row[:end]
                if end is None:
                    going.append(i)
        pending = sorted(going, key=lambda i: -len(prompts[i]) - len(answers[i]))
        if not pending:
            break
    return answers


def main() -> None:
    from peftkit.config import load_config
    from peftkit.data.dataset import load_messages
    from peftkit.data.render import render_prompt
    from peftkit.eval.metrics import METRICS
    from peftkit.infer.chat import load_for_chat
    from peftkit.infer.engine import generate_batch

    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--config", default="examples/resume_ner_lora.yaml")
    parser.add_argument("--records", type=int, default=463)
    parser.add_argument("--slots", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--legacy-batch", type=int, default=64, help="0: skip the legacy path")
    parser.add_argument("--legacy-answers", help="a JSON file: written with the legacy answers, or read when it is skipped")
    parser.add_argument("--bf16", action="store_true", help="also the engine under bf16 autocast, against fp32")
    args = parser.parse_args()

    cfg = load_config(args.config, [])
    model, tok = load_for_chat(cfg.model, args.run, cfg.stage, cfg.data.template)
    model = model.merge_and_unload()  # what eval's adapters_merged does, for both paths
    records = load_messages([str(cfg.eval.dataset)], replace(cfg.data, max_samples=args.records))
    prompts = [render_prompt(tok, r.messages[:-1], r.tools) for r in records]
    references = [r.messages[-1]["content"] for r in records]
    max_new = cfg.generate.max_new_tokens
    runs: dict[str, list[list[int]]] = {}
    rows = []

    def measure(name: str, fn: Any, against: str = "legacy") -> None:
        start = time.time()
        answers = fn()
        seconds = time.time() - start
        runs[name] = answers
        texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
        score = METRICS["ner_json"](texts, references)
        base = runs.get(against)
        same = sum(a == b for a, b in zip(answers, base)) if base is not None else None
        rows.append({"path": name, "seconds": round(seconds, 1), "records_per_s": round(len(prompts) / seconds, 2),
                     "tokens_per_s": round(sum(map(len, answers)) / seconds, 1), "f1": score["f1"],
                     "invalid_json": score["invalid_json"], "same_as_legacy": same})
        print(json.dumps(rows[-1]), flush=True)

    if args.legacy_batch:
        measure("legacy", lambda: legacy(model, tok, prompts, max_new, args.legacy_batch))
        if args.legacy_answers:
            Path(args.legacy_answers).write_text(json.dumps(runs["legacy"]))
    elif args.legacy_answers:
        runs["legacy"] = json.loads(Path(args.legacy_answers).read_text())
    for slots in args.slots:
        measure(f"engine {slots} rows", lambda s=slots: generate_batch(model, tok, prompts, cfg.generate, slots=s))
    if args.bf16:  # identical-to column: against the fp32 engine of the first --slots
        slots = args.slots[0]
        measure(f"engine {slots} rows, bf16 autocast", lambda: generate_batch(model, tok, prompts, cfg.generate,
                                                                              dtype="bfloat16", slots=slots),
                against=f"engine {slots} rows")
    print(f"\n{len(prompts)} records, {sum(map(len, prompts))} prompt tokens, max_new_tokens {max_new}\n")
    print("| path | s | records/s | generated tokens/s | F1 | invalid JSON | token-identical to legacy (bf16: to fp32) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['seconds']} | {r['records_per_s']} | {r['tokens_per_s']} | {r['f1']} | "
              f"{r['invalid_json']} | {'' if r['same_as_legacy'] is None else r['same_as_legacy']} |")


if __name__ == "__main__":
    main()
