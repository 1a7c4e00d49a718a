"""How close a CPU training step comes to the machine's own matrix-product rate, in one run.

    .venv/bin/python benchmarks/cpu_fraction.py                 # both configs, the run as `bf16: auto` picks it
    .venv/bin/python benchmarks/cpu_fraction.py --steps 6 --profile
    CPU_FRACTION_ATTENTION=eager .venv/bin/python benchmarks/cpu_fraction.py  # a lever: another attention

Prints (1) torch.mm's rate at the model's shapes in fp32 and bf16, (2) for each config the training step's real
tokens/s (forward with the chunked loss, backward, AdamW on the trained parameters, as PeftTrainer runs it, with
train.peftkit_speedups auto), (3) the work per token by the formula below and (4) the fraction of the matmul rate
of the step's precision. Configs: `demo` = examples/resume_ner_lora.yaml (SmolLM2-135M, LoRA r16 on the upper 15
of 30 layers, one packed 512-token row a step); `bench` = 64 alpaca_en_demo records, 8 packed rows x 512, LoRA r8
on every linear layer.

Work per token (multiply-adds counted as 2 FLOPs), from the model's shapes:
  forward  = 2·P_layers + 2·P_head·s + 4·A·c·L + 2·P_lora
  backward = 2·P_layers[l0:] + 2·P_head·s + 8·A·c·(L - l0) + 4·P_lora
P_layers: the decoder layers' projection weights; P_head: the output layer (vocab x hidden), run only on the
supervised fraction s of tokens by the chunked loss; A: attention width (heads x head_dim); c: the mean causal
context (sum over records of n(n+1)/2, over tokens); L layers, l0 the lowest layer with a trained parameter (the
backward stops there: activation gradients only above it, nothing below); P_lora: the adapters' weights (their
weight gradients are the 4·P_lora). Norms, activations, softmax and the optimizer are left out (they are the
overhead the fraction shows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATTENTION = "CPU_FRACTION_ATTENTION"  # a lever, set in the environment
SHAPES = [(512, 576, 1536), (512, 1536, 576), (512, 576, 576), (512, 576, 192)]  # SmolLM2-135M's projections


def matmul_rates(repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of torch.mm over the model's projection shapes (sum of FLOPs / sum of median times)."""
    import torch

    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        flops = seconds = 0.0
        for m, k, n in SHAPES:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(3):
                torch.mm(a, b)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                torch.mm(a, b)
                times.append(time.perf_counter() - t)
            seconds += sorted(times)[len(times) // 2]
            flops += 2 * m * k * n
        rates[str(dtype).replace("torch.", "")] = flops / seconds / 1e9
    return rates


def _config(name: str, out: str) -> list[str]:
    if name == "demo":
        return ["train.output_dir=" + out]
    return [f"data.train={REPO / 'data/demo/alpaca_en_demo.json'}", "data.max_samples=64", "data.cutoff_len=512",
            "data.packing=true", f"train.output_dir={out}", "finetuning.lora_rank=8",
            "finetuning.lora_alpha=16", "finetuning.lora_target=all", "train.per_device_train_batch_size=8",
            "train.bf16=auto"]


def work_per_token(model, rows: list[dict]) -> dict[str, float]:
    """The formula of the module docstring, for `rows` (packed rows of one step)."""
    import torch

    from peftkit.constants import IGNORE_INDEX

    base = model.get_base_model()
    text = base.config.get_text_config()
    layers, hidden = text.num_hidden_layers, text.hidden_size
    attn_width = text.num_attention_heads * getattr(text, "head_dim", hidden // text.num_attention_heads)
    head = base.get_output_embeddings()
    p_layers, p_lora, lowest = [0] * layers, 0, layers
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and "lora_" not in name:
            index = next((int(p) for p in name.split(".") if p.isdigit()), None)
            if index is not None:
                p_layers[index] += module.weight.numel()
    for name, p in model.named_parameters():
        if p.requires_grad:
            p_lora += p.numel()
            index = next((int(x) for x in name.split(".") if x.isdigit()), layers)
            lowest = min(lowest, index)
    tokens = sum(len(r["input_ids"]) for r in rows)
    supervised = sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in rows) / tokens
    context = 0
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["position_ids"])]
        context += sum((b - a) * (b - a + 1) // 2 for a, b in zip(starts, starts[1:]))
    c = context / tokens
    p_head = head.weight.numel()
    forward = 2 * sum(p_layers) + 2 * p_head * supervised + 4 * attn_width * c * layers + 2 * p_lora
    backward = 2 * sum(p_layers[lowest:]) + 2 * p_head * supervised + 8 * attn_width * c * (layers - lowest) + 4 * p_lora
    return {"gflop_per_token": (forward + backward) / 1e9, "supervised": supervised, "context": c, "lowest": lowest}


def run_config(name: str, steps: int, profile: bool) -> dict:
    import tempfile

    import torch

    from peftkit.config import load_config
    from peftkit.data import apply_template, build_collator, prepare_data
    from peftkit.model import load_model, load_tokenizer, prepare_for_training
    from peftkit.model.value_head import causal_lm
    from peftkit.train.loss import chunked_lm_loss
    from peftkit.train.speedups import training_speedups

    out = tempfile.mkdtemp(prefix="cpu-fraction-")
    config = REPO / "examples/resume_ner_lora.yaml" if name == "demo" else None
    os.chdir(REPO)
    cfg = load_config(config, _config(name, out))
    bf16 = bool(cfg.train.get("bf16"))
    batch_rows = int(cfg.train.get("per_device_train_batch_size", 8))
    tokenizer = load_tokenizer(cfg.model)
    apply_template(tokenizer, cfg.data.template)
    rows = prepare_data(cfg.data, tokenizer).train
    collate = build_collator(tokenizer, packing=True)
    from dataclasses import replace

    from peftkit.model.dtypes import training_dtype

    model = load_model(replace(cfg.model, dtype=training_dtype(cfg.model.dtype, cfg.train, on_cuda=False)))
    model = prepare_for_training(model, cfg.finetuning)
    if os.environ.get(ATTENTION):  # lever: another attention implementation (eager, sdpa)
        model.get_base_model().set_attn_implementation(os.environ[ATTENTION])
    model.train()
    lm = causal_lm(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # rows spread over the set (packing orders them longest first), the same ones in every run
    step_rows = [[rows[(97 * (s * batch_rows + i)) % len(rows)] for i in range(batch_rows)] for s in range(steps + 1)]

    def step(chosen: list[dict]) -> tuple[float, float]:
        batch = collate(chosen)
        labels = batch.pop("labels")
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total, count = chunked_lm_loss(model, lm, batch, labels)
            loss = total / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t, loss.item()

    result: dict = {"config": name, "bf16": bf16, "steps": []}
    with training_speedups(model, "auto", autocast="bfloat16" if bf16 else None, compiled=False):
        step(step_rows[0])  # warm-up: allocator, kernels
        for chosen in step_rows[1:]:
            seconds, loss = step(chosen)
            real = sum(len(r["input_ids"]) for r in chosen)
            result["steps"].append({"seconds": seconds, "tokens": real, "loss": loss})
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as p:
                step(step_rows[1])
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    result.update(work_per_token(model, step_rows[1]))
    seconds = sum(s["seconds"] for s in result["steps"])
    result["tokens_per_s"] = sum(s["tokens"] for s in result["steps"]) / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--configs", default="demo,bench")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_config(args.child, args.steps, args.profile)))
        return
    rates = matmul_rates()
    print(f"torch.mm at SmolLM2-135M's projection shapes, {os.cpu_count()} CPUs: fp32 {rates['float32']:.0f} GFLOP/s, "
          f"bf16 {rates['bfloat16']:.0f} GFLOP/s\n")
    print("| config | precision | real tokens/s | GFLOP a token | GFLOP/s | fraction of the matmul rate | "
          "step s (each) | loss of the last step |\n|---|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):  # each config in its own process
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps)] + ["--profile"] * args.profile
        r = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout.strip().splitlines()[-1])
        achieved = r["tokens_per_s"] * r["gflop_per_token"]
        peak = rates["bfloat16" if r["bf16"] else "float32"]
        each = ", ".join(f"{s['seconds']:.2f}" for s in r["steps"])
        print(f"| {name} | {'bf16 autocast' if r['bf16'] else 'fp32'} | {r['tokens_per_s']:.0f} | "
              f"{r['gflop_per_token']:.3f} | {achieved:.0f} | {achieved / peak:.0%} | {each} | "
              f"{r['steps'][-1]['loss']:.4f} |")


if __name__ == "__main__":
    main()
