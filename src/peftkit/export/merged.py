"""`peftkit export` (--format merged): one self-contained folder that plain transformers loads, checked before it lands.

LoRA runs are merged into the base weights (in float64, cast once to the stored dtype); freeze / full runs are
copied. A cls run exports a sequence-classification folder; an rm run keeps value_head.safetensors beside
the merged causal LM. The folder is reloaded and compared with the run (logits and chat-template tokens) before
it is renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from peftkit.atomic import storage_errors, write_dir_atomic
from peftkit.errors import PeftkitError
from peftkit.export.checks import (
    EXPORT_MARKER,
    MAX_LOGIT_DIFF,
    ExportReport,
    check_destination,
    check_template,
    load_merged,
    max_diff,
    save_processor,
)
from peftkit.export.hub import model_card
from peftkit.model.families import float64_load_kwargs
from peftkit.model.heads import head_of
from peftkit.rundir import read_run

logger = logging.getLogger("peftkit")


def export_merged(run_dir: str | Path, out: str | Path, max_shard_size: str = "2GB", overwrite: bool = False) -> ExportReport:
    """Merge (lora) or copy (freeze / full) a run into `out`, verify it, then move it into place.

    `out` is replaced only when check_destination allows it (a previous export, or `overwrite`).

    Raises:
        PeftkitError: the run folder is not a peftkit run, `out` may not be replaced, or a check failed
            (nothing is written then).
    """
    import torch

    run_dir, out = Path(run_dir), Path(out)
    trained = read_run(run_dir)  # not a peftkit run: said here, before anything loads
    check_destination(run_dir, out, overwrite)
    run = load_merged(trained)
    model = run.model.to(run.stored_dtype)
    result: dict[str, ExportReport] = {}

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        save_processor(trained, tmp, run.records)  # an image-text run's; its tokenizer is then the run's own
        run.tokenizer.save_pretrained(tmp)
        head = head_of(run.entry.name)
        for extra in head.files:  # rm's value head, carried along
            if (run_dir / extra).is_file():
                shutil.copy2(run_dir / extra, tmp / extra)
        reloaded = head.auto_class(model.config).from_pretrained(tmp, dtype=torch.float64, **float64_load_kwargs(model.config))
        diff = max_diff(run.reference, reloaded, run.prompts)
        if diff >= MAX_LOGIT_DIFF:
            raise PeftkitError(
                f"export check failed: reloaded logits differ from the run's by {diff:.2e} (limit {MAX_LOGIT_DIFF:g}); "
                "the export was not written"
            )
        check_template(run.tokenizer, tmp, run.records, cutoff_len=4096)
        (tmp / "README.md").write_text(model_card(run_dir, "transformers"), encoding="utf-8")
        result["report"] = ExportReport(run.finetuning_type, diff, len(run.records), str(out))
        (tmp / EXPORT_MARKER).write_text(json.dumps(result["report"].__dict__, indent=2) + "\n")

    with storage_errors(out, lambda: f"Kept: {out} as it was (nothing of this export was moved into place)"):
        write_dir_atomic(out, fill)
    report = result["report"]
    logger.info("exported %s run to %s (max logit difference %.2e, %d training records re-rendered identically)",
                run.finetuning_type, out, report.max_logit_diff, len(run.records))
    return report
