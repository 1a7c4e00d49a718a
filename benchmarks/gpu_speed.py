"""GPU training speed: peftkit against the classic padded Trainer and TRL's SFTTrainer, one table per architecture.

    python benchmarks/gpu_speed.py --out results/            # on a CUDA machine (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_speed.py --dry-run --out /tmp/dry  # the same code on a CPU, a tiny config, seconds

Models are random-initialised from the published configs below (weights do not change speed; no hub
download), saved once as checkpoint folders with the embedded SmolLM2 tokenizer, whose 49,152 ids fit
every vocabulary here. Data: the real token ids of alpaca_en_demo and resume-NER records,
interleaved (1,000 of each), repeated as needed. Every approach trains the same folder with the same LoRA (r16, all linear
layers) or full tuning, the same batch (rows or records per step), lr 1e-4, bf16, for --steps steps,
each in its own process (its own peak memory). Throughput counts real (non-padding) tokens over the
steps after --warmup.

MFU = real tokens/s x FLOPs per token / the GPU's dense bf16 peak (H100 / H200: 989 TFLOP/s), with
FLOPs per token = 6 N + 12 n_layers d_model T: N the parameters of every matrix product (embedding
lookups excluded, the output layer included), T the mean record length (packed records attend only
to themselves; the causal half is not subtracted, as in PaLM's formula). With LoRA the frozen weights'
own gradients are not computed (about 4 N of real work): 6 N is the FLOPs of full training, so LoRA's
MFU reads low by about a third; the formula is the same for every approach, so the ratios hold.

The loss check runs the same 32 records through the classic padded forward and through peftkit's
collator and chosen attention at equal (initial) weights: the two token-weighted losses and their difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = [REPO / "data/demo/alpaca_en_demo.json", REPO / "data/resume_ner/train.json"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# Published configs (config.json of each hub repository), the fields that set the compute.
ARCHS = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                   rope_theta=100000.0, max_position_embeddings=8192)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_theta=1000000.0, max_position_embeddings=32768)),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                                   rope_theta=500000.0, max_position_embeddings=131072)),
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_theta=1000000.0, max_position_embeddings=32768)),
    "tiny": ("llama", dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                           max_position_embeddings=4096)),
}

APPROACHES = {
    "classic": "classic Trainer, records padded per batch (sdpa)",
    "trl": "TRL SFTTrainer, BFD packing, padding-free (+ Liger when installed)",
    "peftkit": "peftkit default (packing; attention chosen by model/attention.py)",
    "peftkit_rows": "peftkit, packed rows padded (sdpa)",
    "peftkit_liger": "peftkit + train.use_liger_kernel",
    "peftkit_speedups_on": "peftkit + train.peftkit_speedups=on (the CPU-measured patches)",
    "peftkit_flex": "peftkit, model.attn_implementation=flex_attention",
    "peftkit_fsdp2": "peftkit under FSDP2 (one GPU, world size 1)",
    "peftkit_zero2": "peftkit under DeepSpeed ZeRO-2 (one GPU)",
    "peftkit_zero3": "peftkit under DeepSpeed ZeRO-3 (one GPU)",
    "peftkit_zero3_offload": "peftkit under DeepSpeed ZeRO-3, optimizer and parameters offloaded to CPU",
}
SCALE = ("peftkit_fsdp2", "peftkit_zero2", "peftkit_zero3", "peftkit_zero3_offload")

# (arch, tuning, cutoff, rows per step, approaches): the plan of one full run, about 6 minutes on an H200.
PLAN = [
    ("qwen2.5-1.5b", "lora", 4096, 8, ["classic", "trl", "peftkit", "peftkit_rows", "peftkit_liger"]),
    ("smollm2-135m", "lora", 2048, 32, ["classic", "peftkit", "peftkit_speedups_on"]),
    ("qwen2.5-0.5b", "full", 2048, 8, ["classic", "peftkit"]),
    ("qwen2.5-0.5b", "lora", 2048, 16, ["peftkit", "peftkit_flex"]),
    # issue 19: the engines against plain single-GPU training, same run (last: skipped first when time runs out)
    ("qwen2.5-0.5b", "lora", 2048, 8, ["peftkit", *SCALE]),
    ("qwen2.5-0.5b", "full", 2048, 8, ["peftkit", *SCALE]),
]
DRY_PLAN = [("tiny", "lora", 256, 4, ["classic", "trl", "peftkit", "peftkit_rows"]),
            ("tiny", "full", 256, 4, ["classic", "peftkit"])]


def _records() -> list[dict]:
    """Alpaca (English) and resume-NER (Chinese) records, interleaved (real token ids, a realistic length mix)."""
    sets = [json.loads(path.read_text(encoding="utf-8")) for path in DATA]
    mixed = [r for group in zip(*sets) for r in group]  # 2 x 1,000 records
    return [r for r in mixed if r.get("instruction") and r.get("output")]


def embedded_tokenizer() -> str:
    """The embedded model's tokenizer: carried in .whl/smollm2_tokenizer (benchmarks/fetch_gpu_wheels.sh), else the model."""
    carried = REPO / ".whl/smollm2_tokenizer"
    if (carried / "tokenizer.json").is_file():
        return str(carried)
    from peftkit.model import resolve_model

    return resolve_model("smollm2-135m-instruct")


def build_model(arch: str, folder: Path, device: str) -> Path:
    """A random-initialised checkpoint folder of `arch` with the embedded tokenizer (made once)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, fields = ARCHS[arch]
    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer())
    config = AutoConfig.for_model(kind, **fields, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def flops_per_token(config, mean_len: float) -> float:
    """6 N + 12 n_layers d_model T (see the module docstring)."""
    h, n_layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    n = n_layers * per_layer + h * config.vocab_size
    return 6 * n + 12 * n_layers * h * mean_len


def _training_args(out: str, a: argparse.Namespace) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=a.rows, max_steps=a.steps, learning_rate=1e-4,
                logging_steps=1, save_strategy="no", report_to="none", seed=42, disable_tqdm=True, bf16=True,
                lr_scheduler_type="constant", use_cpu=a.dry_run, gradient_checkpointing=a.tuning == "full")


class Meter:
    """Wraps a collator: real (unpadded) tokens per step, and the time of each step's end (a TrainerCallback)."""

    def __init__(self, collate) -> None:
        self.collate, self.real, self.ends = collate, [], []

    def __call__(self, rows):
        batch = self.collate(rows)
        # padded: the attention mask; padding-free (TRL): every position
        self.real.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
        return batch

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                meter.ends.append(time.perf_counter())

        return _Cb()


def _lora(tuning: str):
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM") \
        if tuning == "lora" else None


def _prompt(r: dict) -> str:
    return r["instruction"] + ("\n" + r["input"] if r.get("input") else "")


def run_classic(a: argparse.Namespace, out: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(a.model)

    def process(r):
        messages = [{"role": "user", "content": _prompt(r)}]
        p = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(messages + [{"role": "assistant", "content": r["output"]}], tokenize=True,
                                       return_dict=False)[: a.cutoff]
        labels = ([-100] * len(p) + full[len(p):])[: len(full)]
        return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}

    ds = Dataset.from_list([process(r) for r in _records()])
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, attn_implementation="sdpa")
    if a.tuning == "lora":
        model = get_peft_model(model, _lora(a.tuning))
    else:
        model.float()  # full tuning: fp32 master weights, bf16 autocast (what Trainer's bf16 does)
    meter = Meter(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer = Trainer(model=model, args=TrainingArguments(**_training_args(out, a)), train_dataset=ds,
                      data_collator=meter, callbacks=[meter.callback()])
    trainer.train()
    return _measure(a, meter.real, meter.ends, [h["loss"] for h in trainer.state.log_history if "loss" in h])


def run_trl(a: argparse.Namespace, out: str) -> dict:
    import importlib.util

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [{"prompt": [{"role": "user", "content": _prompt(r)}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in _records()]
    liger = importlib.util.find_spec("liger_kernel") is not None and not a.dry_run
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa" if a.dry_run else None)
    if a.tuning == "full":
        model.float()
    config = SFTConfig(**_training_args(out, a), max_length=a.cutoff, packing=True, packing_strategy="bfd",
                       padding_free=True, use_liger_kernel=liger)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=_lora(a.tuning))
    meter = Meter(trainer.data_collator)
    trainer.data_collator = meter
    trainer.add_callback(meter.callback())
    trainer.train()
    result = _measure(a, meter.real, meter.ends, [h["loss"] for h in trainer.state.log_history if "loss" in h])
    result["liger"] = liger
    return result


PEFTKIT_EXTRA = {"peftkit": [], "peftkit_rows": ["model.attn_implementation=sdpa"],
                 "peftkit_liger": ["train.use_liger_kernel=true"], "peftkit_speedups_on": ["train.peftkit_speedups=on"],
                 "peftkit_flex": ["model.attn_implementation=flex_attention"],
                 "peftkit_fsdp2": ["train.fsdp=true", "train.fsdp_config={version: 2, auto_wrap_policy: "
                                   "TRANSFORMER_BASED_WRAP, transformer_layer_cls_to_wrap: [Qwen2DecoderLayer]}"],
                 **{f"peftkit_{z}": [f"train.deepspeed={REPO}/examples/deepspeed_{z}.json"]
                    for z in ("zero2", "zero3", "zero3_offload")}}


def run_peftkit(a: argparse.Namespace, out: str, name: str) -> dict:
    from peftkit.config import load_config
    from peftkit.train.run import train

    data = Path(out) / "records.json"
    data.write_text(json.dumps(_records(), ensure_ascii=False), encoding="utf-8")
    cfg = load_config(None, [
        f"model.name_or_path={a.model}", f"data.train={data}", f"data.cutoff_len={a.cutoff}", "data.packing=true",
        f"train.output_dir={out}/run", f"train.per_device_train_batch_size={a.rows}", f"train.max_steps={a.steps}",
        "train.learning_rate=1e-4", "train.logging_steps=1", "train.seed=42", "train.disable_tqdm=true",
        "train.bf16=true", "train.lr_scheduler_type=constant", "train.save_strategy=no",
        f"finetuning.finetuning_type={a.tuning}", "finetuning.lora_rank=16", "finetuning.lora_alpha=32",
        "finetuning.lora_target=all", *([f"train.gradient_checkpointing={a.tuning == 'full'}"]),
        *(["train.use_cpu=true"] if a.dry_run else []), *PEFTKIT_EXTRA[name],
    ])
    result = train(cfg)
    logs = [json.loads(line) for line in (Path(out) / "run/trainer_log.jsonl").read_text().splitlines()]
    logs = [r for r in logs if r["event"] == "log"]
    real = [b["real_tokens_seen"] - a_["real_tokens_seen"] for a_, b in zip([{"real_tokens_seen": 0}] + logs, logs)]
    ends = [r["elapsed_seconds"] for r in logs]
    out_ = _measure(a, real, ends, [r["loss"] for r in logs])
    out_["attention"] = result.model.config._attn_implementation
    return out_


def _measure(a: argparse.Namespace, real: list[int], ends: list[float], losses: list[float]) -> dict:
    """Real tokens/s over the steps after the warmup; first / last loss; peak CUDA memory of this process."""
    import torch

    w = min(a.warmup, len(ends) - 2)
    seconds = ends[-1] - ends[w]
    tokens = sum(real[w + 1: len(ends)])
    cuda = torch.cuda.is_available() and not a.dry_run
    return {"steps": len(ends), "real_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "first_loss": round(losses[0], 4) if losses else None, "last_loss": round(losses[-1], 4) if losses else None,
            "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None}


def loss_check(a: argparse.Namespace) -> dict:
    """The same 32 records at equal weights: classic padded forward against peftkit's collator and attention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.config.schema import DataArgs
    from peftkit.data import apply_template, build_collator, prepare_data
    from peftkit.data.packing import pack_examples
    from peftkit.model.attention import choose_attention, flattens, register_varlen

    device = "cpu" if a.dry_run else "cuda"
    tok = AutoTokenizer.from_pretrained(a.model)
    apply_template(tok, None)
    data = Path(a.scratch) / "check.json"
    data.write_text(json.dumps(_records()[:32], ensure_ascii=False), encoding="utf-8")
    examples = prepare_data(DataArgs(train=str(data), cutoff_len=a.cutoff), tok).train.to_list()
    attn = choose_attention(None, packing=True, on_cuda=device == "cuda") or "sdpa"
    register_varlen()
    dtype = torch.float32 if a.dry_run else torch.bfloat16
    losses = {}
    for name, impl in (("classic", "sdpa"), ("peftkit", attn)):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=impl).to(device)
        with torch.no_grad():
            if name == "classic":
                total, count = 0.0, 0
                for i in range(0, len(examples), 8):
                    chunk = examples[i:i + 8]
                    width = max(len(e["input_ids"]) for e in chunk)
                    ids = torch.tensor([e["input_ids"] + [tok.pad_token_id] * (width - len(e["input_ids"])) for e in chunk])
                    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in chunk])
                    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in chunk])
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                    total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(device),
                                                               ignore_index=-100, reduction="sum").item()
                    count += int((labels[:, 1:] != -100).sum())
                losses[name] = total / count
            else:
                batch = build_collator(tok, packing=True, flatten=flattens(impl))(pack_examples(examples, a.cutoff))
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                losses[name] = model(**batch).loss.item()
        del model
    return {"attention": attn, "classic_loss": round(losses["classic"], 5), "peftkit_loss": round(losses["peftkit"], 5),
            "relative_difference": round(abs(losses["peftkit"] - losses["classic"]) / losses["classic"], 6)}


def run_one(a: argparse.Namespace) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"gpu-{a.run}-", dir=a.scratch) as out:
        if a.run == "classic":
            return run_classic(a, out)
        if a.run == "trl":
            return run_trl(a, out)
        if a.run == "loss_check":
            return loss_check(a)
        return run_peftkit(a, out, a.run)


def table(arch: str, tuning: str, cutoff: int, rows: int, results: dict[str, dict], peak: float | None,
          fpt: float) -> str:
    base = results.get("classic", {}).get("real_tokens_per_s")
    trl = results.get("trl", {}).get("real_tokens_per_s")
    lines = [f"### {arch}, {tuning}, cutoff {cutoff}, {rows} rows (records) per step", "",
             "| approach | real tokens/s | x classic | x TRL | MFU | peak allocated GB | peak reserved GB | "
             "first loss | last loss | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        tps = r.get("real_tokens_per_s")
        note = r.get("error") or ", ".join(f"{k}={r[k]}" for k in ("attention", "liger") if k in r)
        mfu = f"{100 * tps * fpt / peak:.1f}%" if tps and peak else "-"
        lines.append(f"| {APPROACHES.get(name, name)} | {tps or '-'} | "
                     f"{f'{tps / base:.2f}' if tps and base else '-'} | {f'{tps / trl:.2f}' if tps and trl else '-'} | "
                     f"{mfu} | {r.get('peak_allocated_gb') or '-'} | {r.get('peak_reserved_gb') or '-'} | "
                     f"{r.get('first_loss', '-')} | {r.get('last_loss', '-')} | {note} |")
    return "\n".join(lines)


def _peak() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_speed.md / .json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny config, 6 steps: checks the script")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--budget", type=float, default=420, help="seconds; approaches not started by then are skipped")
    parser.add_argument("--scratch", default=None, help="where model folders and runs go (default: OUT/scratch)")
    for name in ("run", "model", "tuning", "cutoff", "rows"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    a = parser.parse_args()
    a.steps = a.steps or (6 if a.dry_run else 20)
    a.warmup = a.warmup if a.warmup is not None else (2 if a.dry_run else 5)
    out = Path(a.out)
    scratch = Path(a.scratch or out / "scratch")
    scratch.mkdir(parents=True, exist_ok=True)
    if a.run:
        a.cutoff, a.rows, a.scratch = int(a.cutoff), int(a.rows), str(scratch)
        print(json.dumps(run_one(a)))
        return
    start = time.time()
    device, peak = _peak()
    plan = DRY_PLAN if a.dry_run else PLAN
    report = {"device": device, "peak_flops": peak, "steps": a.steps, "warmup": a.warmup, "tables": []}
    sections = [f"# GPU training speed ({device}; {a.steps} steps, throughput after step {a.warmup}; "
                f"benchmarks/gpu_speed.py{' --dry-run' if a.dry_run else ''})\n"]
    from transformers import AutoConfig

    for arch, tuning, cutoff, rows, approaches in plan:
        model = build_model(arch, scratch / arch, "cpu" if a.dry_run else "cuda")
        results: dict[str, dict] = {}
        for name in approaches + (["loss_check"] if tuning == "lora" else []):
            if time.time() - start > a.budget:
                results[name] = {"error": "skipped: --budget spent"}
                continue
            cmd = [sys.executable, __file__, "--out", str(out), "--scratch", str(scratch), "--run", name, "--model",
                   str(model), "--tuning", tuning, "--cutoff", str(cutoff), "--rows", str(rows),
                   "--steps", str(a.steps), "--warmup", str(a.warmup), *(["--dry-run"] if a.dry_run else [])]
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            if name in SCALE:  # a process group of one, as torchrun would set it up
                env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                results[name] = {"error": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1][:200]}"
                                 if proc.stderr.strip() else f"failed (exit {proc.returncode})"}
                (out / f"{arch}-{tuning}-{name}.stderr.txt").write_text(proc.stderr[-20000:])
            else:
                results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{arch} {tuning} {name}: {results[name]}", file=sys.stderr, flush=True)
        check = results.pop("loss_check", None)
        config = AutoConfig.from_pretrained(model)
        mean_len = statistics.mean(len(e) for e in _record_lengths(model, cutoff))
        fpt = flops_per_token(config, mean_len)
        text = table(arch, tuning, cutoff, rows, results, peak, fpt)
        if check and "error" not in check:
            text += (f"\n\nLoss at equal weights, 32 records: classic padded {check['classic_loss']}, peftkit "
                     f"({check['attention']}) {check['peftkit_loss']}, relative difference {check['relative_difference']}")
        elif check:
            text += f"\n\nLoss check: {check['error']}"
        sections.append(text + f"\n\nFLOPs per token (6N + 12 L d T, T = {mean_len:.0f}): {fpt / 1e9:.2f} GFLOP\n")
        report["tables"].append({"arch": arch, "tuning": tuning, "cutoff": cutoff, "rows": rows, "results": results,
                                 "loss_check": check, "flops_per_token": fpt})
        (out / "gpu_speed.json").write_text(json.dumps(report, indent=2))
        (out / "gpu_speed.md").write_text("\n".join(sections))
    print("\n".join(sections))


def _record_lengths(model: Path, cutoff: int) -> list[list[int]]:
    """Token ids of the benchmark's records under the model's tokenizer (for T in the FLOP formula)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [_prompt(r) + r["output"] for r in _records()[:500]]
    return [ids[:cutoff] for ids in tok(texts)["input_ids"]]


if __name__ == "__main__":
    main()
