"""The preference stages on the shared demo data: held-out pair accuracy and reward margin before and after
training, for each dpo pair loss and kto, each through `peftkit train` on its examples/ config.

    .venv/bin/python benchmarks/preference_stages.py [--runs sigmoid ipo hinge orpo simpo kto] [--out /tmp/pref]

Every run evaluates on data/demo/dpo_en_heldout.json (50 pairs never trained on). The table is printed in
markdown; each run's folder keeps its run_summary.json and pair_scores.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name -> (config, overrides)
    "sigmoid": ("examples/dpo_lora.yaml", []),
    "ipo": ("examples/dpo_lora.yaml", ["finetuning.pref_loss=ipo"]),
    "hinge": ("examples/dpo_lora.yaml", ["finetuning.pref_loss=hinge"]),
    "orpo": ("examples/orpo_lora.yaml", []),
    "simpo": ("examples/simpo_lora.yaml", []),
    "kto": ("examples/kto_lora.yaml", []),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", default="/tmp/preference_stages")
    args = parser.parse_args()
    rows = []
    for name in args.runs:
        config, overrides = RUNS[name]
        out = Path(args.out) / name
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "peftkit", "train", config, *overrides, f"train.output_dir={out}",
                        "train.overwrite_output_dir=true"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        summary = json.loads((out / "run_summary.json").read_text())
        before, after = summary["metrics_before"], summary["metrics_after"]
        rows.append(f"| {name} | `{config}`{' ' + ' '.join(overrides) if overrides else ''} | "
                    f"{before['rewards/accuracies']:.2f} → {after['rewards/accuracies']:.2f} | "
                    f"{before['rewards/margins']:.4f} → {after['rewards/margins']:.4f} | {wall / 60:.1f} min |")
        print(rows[-1], flush=True)
    print("\n| loss | config | held-out pair accuracy | reward margin | wall |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
