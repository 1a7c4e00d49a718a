"""GGUF export of a trained run: wall time, file size, logit agreement, and greedy answers on dev sentences
compared with the merged transformers model.

    .venv/bin/python benchmarks/gguf_export.py RUN_DIR [--records 10] [--quants f16 q8_0]

RUN_DIR is a finished `peftkit train` output_dir (the demo: outputs/resume_ner_lora). Each GGUF file is
read back by transformers (`gguf_file=`, dequantised to float32): the same loader llama.cpp's layout has
to satisfy, as llama-cpp-python has no wheel for this machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.config.schema import GenerateArgs
    from peftkit.data.dataset import load_messages
    from peftkit.data.render import render_prompt
    from peftkit.export import export
    from peftkit.export.llamacpp import export_gguf
    from peftkit.infer.engine import generate_batch

    logging.basicConfig(level=logging.INFO, format="[peftkit] %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--no-limit", action="store_true", help="measure without export's logit limit")
    args = parser.parse_args()
    run = Path(args.run)
    if args.no_limit:
        import peftkit.export.llamacpp as merge

        merge.GGUF_MAX_LOGIT_DIFF = dict.fromkeys(merge.GGUF_MAX_LOGIT_DIFF, float("inf"))
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))

    from peftkit.config.schema import DataArgs

    data = DataArgs(**{**config["data"], "max_samples": args.records})
    tokenizer = AutoTokenizer.from_pretrained(run)
    records = load_messages([config["eval"]["dataset"]], data)
    prompts = [render_prompt(tokenizer, r.messages[:-1], r.tools) for r in records]
    gen = GenerateArgs(max_new_tokens=256)

    start = time.time()
    export(run, work / "merged")
    merged_seconds = time.time() - start
    merged = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32)
    want = [tokenizer.decode(a, skip_special_tokens=True) for a in generate_batch(merged, tokenizer, prompts, gen)]
    rows = [{"format": "transformers (merged, reference)", "seconds": round(merged_seconds, 1),
             "mb": round(sum(p.stat().st_size for p in (work / "merged").glob("*.safetensors")) / 2**20, 1)}]
    for quant in args.quants:
        start = time.time()
        report = export_gguf(run, work / quant, quant=quant)
        seconds = time.time() - start
        path = Path(report.out)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        got = [tokenizer.decode(a, skip_special_tokens=True) for a in generate_batch(model, tokenizer, prompts, gen)]
        rows.append({"format": f"gguf {quant}", "seconds": round(seconds, 1), "mb": round(path.stat().st_size / 2**20, 1),
                     "max_logit_diff": round(report.max_logit_diff, 4),
                     "same_greedy_answers": f"{sum(a == b for a, b in zip(want, got))}/{len(want)}"})
    print(json.dumps(rows, indent=2, ensure_ascii=False))
    print("| format | export s | size MB | max logit diff | greedy answers equal to merged |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['seconds']} | {r['mb']} | {r.get('max_logit_diff', '')} | "
              f"{r.get('same_greedy_answers', '')} |")


if __name__ == "__main__":
    main()
