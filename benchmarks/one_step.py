"""One packed training step (8 rows x 512 tokens of alpaca_en_demo, SmolLM2-135M, LoRA r8 all-linear), as
PeftTrainer runs it: the loss at the same weights in fp32 and bf16 autocast, the time of each step and
peak RSS. The loss of step 1 is what "bf16 matches fp32" means here (no optimizer step in between).

    .venv/bin/python benchmarks/one_step.py --steps 4            # fp32, then bf16 in a second process
    .venv/bin/python benchmarks/one_step.py --bf16 --profile     # + torch.profiler's top operators
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(bf16: bool, steps: int, profile: bool) -> dict:
    import torch

    from peftkit.config import load_config
    from peftkit.data import apply_template, build_collator, prepare_data
    from peftkit.model import load_model, load_tokenizer, prepare_for_training
    from peftkit.model.value_head import causal_lm
    from peftkit.train.loss import chunked_lm_loss
    from peftkit.train.speedups import training_speedups

    out = tempfile.mkdtemp(prefix="one-step-")
    cfg = load_config(None, [f"data.train={REPO / 'data/demo/alpaca_en_demo.json'}", "data.max_samples=64",
                             "data.cutoff_len=512", "data.packing=true", f"train.output_dir={out}",
                             "finetuning.lora_rank=8", "finetuning.lora_alpha=16"])
    tokenizer = load_tokenizer(cfg.model)
    apply_template(tokenizer, cfg.data.template)
    rows = prepare_data(cfg.data, tokenizer).train
    batch = build_collator(tokenizer, packing=True)([rows[i] for i in range(8)])
    labels = batch.pop("labels")
    real = sum(len(rows[i]["input_ids"]) for i in range(8))  # tokens that are not padding
    model = prepare_for_training(load_model(cfg.model), cfg.finetuning)
    model.train()
    lm = causal_lm(model)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total, count = chunked_lm_loss(model, lm, batch, labels)
            loss = total / count
        loss.backward()
        model.zero_grad()
        return loss.item()

    result: dict = {"bf16": bf16, "real_tokens": real, "steps": []}
    with training_speedups(model, "auto", autocast="bfloat16" if bf16 else None, compiled=False):  # as PeftTrainer.train
        for _ in range(steps):
            t = time.perf_counter()
            loss = step()
            result["steps"].append({"seconds": round(time.perf_counter() - t, 2), "loss": round(loss, 6)})
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as p:
                step()
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="only bf16 (default: fp32, then bf16)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.bf16, args.steps, args.profile)))
        return
    results = []
    for bf16 in ([True] if args.bf16 else [False, True]):  # each in its own process: peak RSS is its own
        cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps)] + ["--bf16"] * bf16
        cmd += ["--profile"] * args.profile
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("| setting | step seconds | real tokens/s (last step) | loss of step 1 | peak RSS GB |\n|---|---|---|---|---|")
    for r in results:
        secs = [s["seconds"] for s in r["steps"]]
        print(f"| {'bf16 autocast' if r['bf16'] else 'fp32'} | {', '.join(map(str, secs))} | "
              f"{r['real_tokens'] / secs[-1]:.0f} | {r['steps'][0]['loss']:.5f} | {r['peak_rss_gb']} |")
    if len(results) == 2:
        difference = abs(results[0]["steps"][0]["loss"] - results[1]["steps"][0]["loss"])
        print(f"\nloss difference at the same weights: {difference:.1e}")


if __name__ == "__main__":
    main()
