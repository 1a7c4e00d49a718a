"""Preprocessing speed of the data engine: records/s on alpaca_en_demo with the embedded tokenizer.

Run: .venv/bin/python benchmarks/preprocess.py [--repeat 3] [--file data/demo/alpaca_en_demo.json]
Prints a markdown table (cold = tokenize and write the cache; warm = read the cache) and packing efficiency.
Each cold run uses a fresh cache folder, so nothing is reused between repeats.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="data/demo/alpaca_en_demo.json")
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()

    import peftkit.data.cache as cache
    from peftkit.config.schema import DataArgs, ModelArgs
    from peftkit.data import prepare_data
    from peftkit.model import load_tokenizer

    tokenizer = load_tokenizer(ModelArgs())
    print(f"| setting | records | cold s (median of {args.repeat}) | records/s | warm s | packing efficiency |")
    print("|---|---|---|---|---|---|")
    for label, options in (("unpacked, 1 process", {}), ("packed, 1 process", {"packing": True}),
                           ("packed, 2 processes", {"packing": True, "preprocessing_num_workers": 2})):
        data_args = DataArgs(train=args.file, cutoff_len=args.cutoff_len, **options)
        cold, warm = [], []
        for _ in range(args.repeat):
            home = Path(tempfile.mkdtemp(prefix="peftkit-bench-"))
            cache.peftkit_home = lambda home=home: home
            start = time.perf_counter()
            data = prepare_data(data_args, tokenizer)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            prepare_data(data_args, tokenizer)
            warm.append(time.perf_counter() - start)
        records = data.report.records
        eff = f"{data.report.packing['efficiency']:.1%}" if data.report.packing else "-"
        c = statistics.median(cold)
        print(f"| {label} | {records} | {c:.2f} | {records / c:.0f} | {statistics.median(warm):.3f} | {eff} |")


if __name__ == "__main__":
    main()
