"""Training speed and memory: peftkit (packing on / off, fp32 / bf16, options) against the classic padded
Trainer and TRL's SFTTrainer, on the same records, model and hyperparameters, in one invocation.

    .venv/bin/python benchmarks/train_speed.py                    # every approach twice, alternating
    .venv/bin/python benchmarks/train_speed.py --records 16 --repeats 1 --approaches classic peftkit_packed

Each run is its own process (so peak RSS is that run's), on the embedded SmolLM2-135M-Instruct, LoRA r=8
on all linear layers, alpaca_en_demo records, max length 512, batch 8, one epoch, lr 1e-4, seed 42.
Writes benchmarks/results/train_speed.{md,json}. TRL comes from the `bench` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data/demo/alpaca_en_demo.json"
APPROACHES = {
    "classic": "classic Trainer + DataCollatorForSeq2Seq (per-record map, padded)",
    "trl": "TRL SFTTrainer, no packing",
    "trl_bfd": "TRL SFTTrainer, BFD packing (padding-free, one row per batch)",
    "peftkit": "peftkit, no packing",
    "peftkit_packed": "peftkit, packing (rows of 512)",
    "peftkit_packed_bf16": "peftkit, packing, bf16 autocast",
    "peftkit_packed_bf16_gc": "peftkit, packing, bf16 autocast, gradient checkpointing",
    "peftkit_packed_nochunk": "peftkit, packing, standard (unchunked) loss",
    "peftkit_packed_bf16_compile": "peftkit, packing, bf16 autocast, torch.compile (compile time included)",
}
DEFAULT = ["classic", "trl", "trl_bfd", "peftkit", "peftkit_packed", "peftkit_packed_bf16",
           "peftkit_packed_bf16_gc", "peftkit_packed_nochunk"]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _records(n: int) -> list[dict]:
    return json.loads(DATA.read_text())[:n]


class Counter:
    """Wraps a collator to count tokens fed, real (unpadded) and supervised."""

    def __init__(self, collate, pad_id: int) -> None:
        self.collate, self.pad_id = collate, pad_id
        self.fed = self.real = self.supervised = 0

    def __call__(self, rows):
        batch = self.collate(rows)
        ids, labels = batch["input_ids"], batch["labels"]
        self.fed += ids.numel()
        if "attention_mask" in batch:
            self.real += int(batch["attention_mask"].sum())
        elif "position_ids" in batch and ids.shape[0] == 1:  # padding-free: no padding at all
            self.real += ids.numel()
        else:
            self.real += sum(len(r["input_ids"]) for r in rows)
        self.supervised += int((labels[:, 1:] != -100).sum())
        return batch


def _training_args(out: str, args: argparse.Namespace, **extra):
    common = dict(output_dir=out, per_device_train_batch_size=args.batch, num_train_epochs=1, learning_rate=1e-4,
                  logging_steps=1, save_strategy="no", report_to="none", seed=42, use_cpu=True, disable_tqdm=True,
                  lr_scheduler_type="constant")
    common.update(extra)
    return common


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def run_classic(args: argparse.Namespace, out: str) -> dict:
    """The original tutorial's way: map each record through the chat template, pad per batch."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from peftkit.model import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    t = time.perf_counter()

    def process(record):
        prompt = record["instruction"] + ("\n" + record["input"] if record["input"] else "")
        messages = [{"role": "user", "content": prompt}]
        p = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": record["output"]}],
                                             tokenize=True, return_dict=False)
        full = full[: args.max_len]
        return {"input_ids": full, "attention_mask": [1] * len(full), "labels": [-100] * len(p) + full[len(p):]}

    ds = Dataset.from_list(_records(args.records)).map(process, remove_columns=["instruction", "input", "output"])
    prep = time.perf_counter() - t
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load = time.perf_counter() - t
    model = get_peft_model(model, _lora())
    counter = Counter(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100), tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=TrainingArguments(**_training_args(out, args)), train_dataset=ds,
                      data_collator=counter)
    return _train_and_measure(trainer, counter, len(ds), prep, load)


def run_trl(args: argparse.Namespace, out: str, packing: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from peftkit.model import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{"prompt": [{"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in _records(args.records)]
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load = time.perf_counter() - t
    config = SFTConfig(**_training_args(out, args), max_length=args.max_len, packing=packing)
    t = time.perf_counter()
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=_lora())
    prep = time.perf_counter() - t  # SFTTrainer tokenizes (and packs) in its constructor
    counter = Counter(trainer.data_collator, tokenizer.pad_token_id)
    trainer.data_collator = counter
    return _train_and_measure(trainer, counter, len(rows), prep, load)


def run_peftkit(args: argparse.Namespace, out: str, *overrides: str) -> dict:
    from peftkit.config import load_config
    from peftkit.data import apply_template, prepare_data
    from peftkit.model import load_model, load_tokenizer
    from peftkit.train.run import train

    data_file = Path(out) / "records.json"
    data_file.write_text(json.dumps(_records(args.records)))
    cfg = load_config(None, [
        f"data.train={data_file}", f"data.cutoff_len={args.max_len}", f"train.output_dir={out}/run",
        f"train.per_device_train_batch_size={args.batch}", "train.num_train_epochs=1", "train.learning_rate=1e-4",
        "train.logging_steps=1", "train.seed=42", "train.disable_tqdm=true", "train.lr_scheduler_type=constant",
        "finetuning.lora_rank=8", "finetuning.lora_alpha=16", *overrides,
    ])
    tokenizer = load_tokenizer(cfg.model)
    apply_template(tokenizer, cfg.data.template)
    t = time.perf_counter()
    prepare_data(cfg.data, tokenizer)  # cold: PEFTKIT_HOME is a fresh folder for this run
    prep = time.perf_counter() - t
    t = time.perf_counter()
    load_model(cfg.model)
    load = time.perf_counter() - t
    result = train(cfg)
    rows = [json.loads(line) for line in (Path(out) / "run/trainer_log.jsonl").read_text().splitlines()]
    logs = [r for r in rows if r["event"] == "log"]
    end = rows[-1]
    wall = result.summary["train_seconds"]
    return _result(len(_records(args.records)), prep, load, wall, len(logs), end["tokens_seen"], end["real_tokens_seen"],
                   end["supervised_tokens_seen"], [r["loss"] for r in logs])


def _train_and_measure(trainer, counter: Counter, records: int, prep: float, load: float) -> dict:
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _result(records, prep, load, wall, trainer.state.global_step, counter.fed, counter.real, counter.supervised,
                   losses)


def _result(records, prep, load, wall, steps, fed, real, supervised, losses) -> dict:
    return {
        "records": records, "preprocess_s": round(prep, 3), "preprocess_records_per_s": round(records / prep, 1),
        "model_load_s": round(load, 3), "train_s": round(wall, 2), "steps": steps, "tokens_fed": fed,
        "tokens_real": real, "tokens_supervised": supervised, "real_tokens_per_s": round(real / wall, 1),
        "supervised_tokens_per_s": round(supervised / wall, 1), "padding": round(1 - real / fed, 4) if fed else None,
        "peak_rss_gb": round(_peak_rss_gb(), 2), "final_loss": round(losses[-1], 4),
        "mean_loss": round(statistics.mean(losses), 4),
    }


def run_one(name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as out:
        os.environ["PEFTKIT_HOME"] = str(Path(out) / "home")  # a cold data cache; the model comes from below
        link = Path(out) / "home" / "models"
        link.parent.mkdir(parents=True)
        link.symlink_to(Path(args.model_home) / "models")
        if name == "classic":
            return run_classic(args, out)
        if name.startswith("trl"):
            return run_trl(args, out, packing=name == "trl_bfd")
        overrides = []
        if "packed" in name:
            overrides.append("data.packing=true")
        if "bf16" in name:
            overrides.append("train.bf16=true")
        if name.endswith("_gc"):
            overrides.append("train.gradient_checkpointing=true")
        if name.endswith("_nochunk"):
            overrides.append("train.chunked_loss=false")
        if name.endswith("_compile"):
            overrides.append("train.torch_compile=true")
        return run_peftkit(args, out, *overrides)


def table(results: dict[str, list[dict]]) -> str:
    base = statistics.mean(r["real_tokens_per_s"] for r in results["classic"]) if "classic" in results else None
    base_rss = statistics.mean(r["peak_rss_gb"] for r in results["classic"]) if "classic" in results else None
    lines = ["| approach | real tokens/s (runs) | × classic | supervised tok/s | padding | peak RSS GB (× classic) | "
             "steps | train s | mean loss | final loss | preprocess rec/s | model load s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        tps = [r["real_tokens_per_s"] for r in runs]
        rss = statistics.mean(r["peak_rss_gb"] for r in runs)
        ratio = f"{statistics.mean(tps) / base:.2f}" if base else "-"
        rss_ratio = f" ({rss / base_rss:.2f})" if base_rss else ""
        lines.append(
            f"| {APPROACHES[name]} | {', '.join(f'{t:.0f}' for t in tps)} | {ratio} | "
            f"{statistics.mean(r['supervised_tokens_per_s'] for r in runs):.0f} | {runs[0]['padding']:.0%} | "
            f"{rss:.1f}{rss_ratio} | {runs[0]['steps']} | {statistics.mean(r['train_s'] for r in runs):.1f} | "
            f"{runs[0]['mean_loss']:.4f} | {runs[0]['final_loss']:.4f} | "
            f"{statistics.mean(r['preprocess_records_per_s'] for r in runs):.0f} | "
            f"{statistics.mean(r['model_load_s'] for r in runs):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--approaches", nargs="+", default=DEFAULT, choices=list(APPROACHES))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one approach in this process
    parser.add_argument("--model-home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args)))
        return

    from peftkit.model.resolve import ensure_embedded_model, peftkit_home

    ensure_embedded_model()
    results: dict[str, list[dict]] = {name: [] for name in args.approaches}
    for repeat in range(args.repeats):
        for name in args.approaches:  # alternating, so drifts of the machine hit every approach alike
            cmd = [sys.executable, __file__, "--run", name, "--records", str(args.records), "--max-len",
                   str(args.max_len), "--batch", str(args.batch), "--model-home", str(peftkit_home())]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"[{repeat + 1}/{args.repeats}] {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    text = (f"{args.records} alpaca_en_demo records, max length {args.max_len}, batch {args.batch}, "
            f"{args.repeats} runs each (alternating), LoRA r=8 all linear, SmolLM2-135M-Instruct, "
            f"{os.cpu_count()} CPUs\n\n{table(results)}\n")
    (out / "train_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
