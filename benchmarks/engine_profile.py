"""Where a decode step of peftkit's engine goes: torch.profiler over generation of N dev prompts with the demo
adapter merged (as eval and serve run it), ops grouped into matrix products, attention, the slot cache's
copies / masks, sampling, and the rest (Python and dispatch: wall time no op accounts for).

    .venv/bin/python benchmarks/engine_profile.py RUN_DIR [--rows 64] [--records 64] [--max-new-tokens 64]

Prints ms per engine step (prefills included), the share of each group and the top ops; run it alone.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

GROUPS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax"),
    "cache copies, masks, indexing": ("aten::copy_", "aten::index", "aten::cat", "aten::where", "aten::slice_scatter",
                                      "aten::masked_fill", "aten::clone", "aten::contiguous", "aten::fill_",
                                      "aten::zero_", "aten::narrow", "aten::select_scatter"),
    "sampling": ("aten::argmax", "aten::topk", "aten::sort", "aten::multinomial", "aten::max"),
    "elementwise (norms, rotary, activations)": ("aten::mul", "aten::add", "aten::silu", "aten::rsqrt", "aten::pow",
                                                 "aten::mean", "aten::neg", "aten::cos", "aten::sin", "aten::to",
                                                 "aten::_to_copy", "aten::div", "aten::sub"),
}


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from peftkit.config import load_config
    from peftkit.config.schema import GenerateArgs
    from peftkit.data.dataset import load_messages
    from peftkit.data.render import render_prompt
    from peftkit.infer.chat import load_for_chat
    from peftkit.infer.engine import Engine
    from peftkit.infer.jobs import Sampling
    from peftkit.infer.merging import adapters_merged
    from peftkit.rundir import read_run

    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--bf16-weights", action="store_true", help="the merged weights stored in bf16 (no autocast)")
    args = parser.parse_args()
    run = read_run(args.run)
    cfg = load_config("examples/resume_ner_lora.yaml", [f"eval.max_samples={args.records}"])
    model, tokenizer = load_for_chat(run.base_model, args.run, run.stage, run.template)
    records = load_messages([str(cfg.eval.dataset)], cfg.data)[: args.records]
    prompts = [render_prompt(tokenizer, r.messages[:-1], r.tools) for r in records]
    sampling = Sampling.of(GenerateArgs(max_new_tokens=args.max_new_tokens))
    with adapters_merged(model):
        if args.bf16_weights:
            model.to(torch.bfloat16)
        longest = max(map(len, prompts)) + args.max_new_tokens + 1
        Engine(model, tokenizer, slots=args.rows, max_len=longest).generate(prompts[:4], sampling)  # warm-up
        engine = Engine(model, tokenizer, slots=args.rows, max_len=longest)
        steps = [0]
        real_step = engine.step

        def counted() -> object:
            steps[0] += 1
            return real_step()

        engine.step = counted  # type: ignore[method-assign]
        start = time.time()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            jobs = engine.generate(prompts, sampling)
        wall = time.time() - start
    tokens = sum(len(j.tokens) for j in jobs)
    events = prof.key_averages()
    total_us = wall * 1e6
    grouped: dict[str, float] = defaultdict(float)
    for e in events:
        group = next((g for g, keys in GROUPS.items() if any(k in e.key for k in keys)), None)
        if group:
            grouped[group] += e.self_cpu_time_total
    print(f"{len(prompts)} prompts, {args.rows} rows, {tokens} tokens in {wall:.1f} s ({tokens / wall:.0f} tokens/s), "
          f"{steps[0]} engine steps, {1000 * wall / max(steps[0], 1):.0f} ms a step (profiler on)")
    accounted = sum(grouped.values())
    for group, us in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"  {group:45s} {100 * us / total_us:5.1f}%")
    print(f"  {'other ops, Python and dispatch':45s} {100 * (total_us - accounted) / total_us:5.1f}%")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    del torch


if __name__ == "__main__":
    main()
