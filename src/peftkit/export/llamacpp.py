"""The llama.cpp targets of `peftkit export`: a run merged into one GGUF file (+ an Ollama Modelfile), and a LoRA
run as llama.cpp's adapter GGUF. Both are refused before any merging where the file or its check cannot carry the
model (model/families.py: gguf_refusal), read back and compared with the run, then moved into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from peftkit.atomic import storage_errors, write_dir_atomic
from peftkit.config.schema import ModelArgs
from peftkit.errors import PeftkitError
from peftkit.export.checks import (
    EXPORT_MARKER,
    ExportReport,
    check_destination,
    check_template,
    load_merged,
    max_diff,
    run_model_config,
)
from peftkit.export.hub import model_card
from peftkit.model.families import GGUF_ARCHITECTURES, float64_load_kwargs, gguf_refusal
from peftkit.model.heads import head_of
from peftkit.rundir import read_run

logger = logging.getLogger("peftkit")



# The largest |logit difference| between the GGUF file (read back by transformers) and the run, over the
# full vocabulary at every position of the check prompts, per type. Measured on the demo adapter
# (SmolLM2-135M, benchmarks/gguf_export.py): f16 0.048, bf16 0.29, q8_0 1.29; the limits leave 2-5x room
# for other models and still catch a wrong tensor layout (a missing q / k permutation is off by tens).
GGUF_MAX_LOGIT_DIFF = {"f16": 0.25, "bf16": 1.0, "q8_0": 3.0}


def export_gguf(run_dir: str | Path, out: str | Path, quant: str = "q8_0", overwrite: bool = False) -> ExportReport:
    """Merge a run and write it as `out`/model-QUANT.gguf plus an Ollama Modelfile, verified, then moved into place.

    The checks read the file back with transformers (`gguf_file=`): logits against the merged model within
    GGUF_MAX_LOGIT_DIFF[quant], and the embedded tokenizer + chat template render the training records
    to the same tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.data.template import stop_token_ids
    from peftkit.export.gguf import QUANTS, modelfile, tokenizer_refusal, write_gguf

    run_dir, out = Path(run_dir), Path(out)
    if quant not in QUANTS:
        raise PeftkitError(f"--quant {quant}: one of {', '.join(QUANTS)}")
    trained = read_run(run_dir)  # not a peftkit run: said here, before anything loads
    head = head_of(trained.stage)
    if not head.gguf:
        raise PeftkitError(f"--format gguf: stage {trained.stage} has a {head.name} head, which llama.cpp "
                           "does not run; export it as a transformers folder (the default --format hf)")
    tokenizer_home = trained.path if (trained.path / "tokenizer.json").is_file() else Path(trained.base_model)
    refusal = gguf_refusal(run_model_config(trained)) or tokenizer_refusal(tokenizer_home)  # before any merging
    if refusal:
        raise PeftkitError(refusal)
    check_destination(run_dir, out, overwrite)
    run = load_merged(trained)
    model = run.model.to(torch.float32)
    name = f"model-{quant}.gguf"
    result: dict[str, ExportReport] = {}

    def fill(tmp: Path) -> None:
        staging = tmp / "hf"
        model.save_pretrained(staging)
        run.tokenizer.save_pretrained(staging)
        write_gguf(staging, tmp / name, quant, run.tokenizer, run.tokenizer.chat_template)
        shutil.rmtree(staging)
        try:
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=name, dtype=torch.float64,
                                                            **float64_load_kwargs(model.config))
        except (RuntimeError, ValueError, KeyError) as e:  # a layout transformers' GGUF reader does not take
            raise PeftkitError(f"export check failed: transformers could not read the GGUF file back "
                               f"({str(e).splitlines()[0][:200]}); the export was not written") from e
        diff = max_diff(run.reference, reloaded, run.prompts)
        limit = GGUF_MAX_LOGIT_DIFF[quant]
        if diff >= limit:
            raise PeftkitError(f"export check failed: the GGUF file's logits differ from the run's by {diff:.3g} "
                               f"(limit {limit:g} for {quant}); the export was not written")
        exported = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
        check_template(run.tokenizer, exported, run.records, cutoff_len=4096)
        stops = [run.tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(run.tokenizer)]
        (tmp / "Modelfile").write_text(modelfile(name, stops), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(run_dir, "gguf"), encoding="utf-8")
        result["report"] = ExportReport(run.finetuning_type, diff, len(run.records), str(out / name))
        (tmp / EXPORT_MARKER).write_text(json.dumps({**result["report"].__dict__, "quant": quant}, indent=2) + "\n")

    with storage_errors(out, lambda: f"Kept: {out} as it was (nothing of this export was moved into place)"):
        write_dir_atomic(out, fill)
    report = result["report"]
    logger.info("exported %s run to %s (%s, max logit difference %.3g, %d training records re-rendered identically)",
                run.finetuning_type, report.out, quant, report.max_logit_diff, len(run.records))
    return report


GGUF_LORA_MAX_DIFF = 1e-5  # float32 written and read back: only the matmul's rounding differs


def export_gguf_lora(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> ExportReport:
    """A LoRA run as llama.cpp's adapter GGUF (`llama-cli -m BASE.gguf --lora OUT/adapter-f32.gguf`), verified
    before it is moved into place: read back with the gguf package, every module's (alpha / r)·B·A must equal
    peft's own delta weight (get_delta_weight, q / k rows in llama.cpp's order) within GGUF_LORA_MAX_DIFF.
    The report's max_logit_diff field holds that delta-weight difference (no logits are computed)."""
    import gguf
    import numpy as np

    from peftkit.export.gguf import _permute, lora_tensors, write_gguf_lora
    from peftkit.infer.chat import load_for_chat

    run_dir, out = Path(run_dir), Path(out)
    trained = read_run(run_dir)
    if not trained.is_adapter:
        raise PeftkitError(f"--format gguf-lora: {run_dir} is not a LoRA run; export it whole with --format gguf")
    head = head_of(trained.stage)
    if not head.gguf:
        raise PeftkitError(f"--format gguf-lora: stage {trained.stage} has a {head.name} head, which llama.cpp does "
                           "not run")
    refusal = gguf_refusal(run_model_config(trained))
    if refusal:
        raise PeftkitError(refusal.replace("--format gguf:", "--format gguf-lora:", 1))
    check_destination(run_dir, out, overwrite)
    base = trained.base_model
    model, _ = load_for_chat(ModelArgs(name_or_path=base), str(run_dir))
    config = model.get_base_model().config.to_dict()
    arch_name = (config.get("architectures") or ["?"])[0]
    tensors, alpha, modules = lora_tensors(model, arch_name, config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    name = "adapter-f32.gguf"
    result: dict[str, ExportReport] = {}

    def fill(tmp: Path) -> None:
        write_gguf_lora(tmp / name, arch_name, tensors, alpha, Path(base).name)
        reader = gguf.GGUFReader(str(tmp / name))
        read = {t.name: np.asarray(t.data) for t in reader.tensors}
        written_alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].parts[-1][0])
        diff = 0.0
        for module_name, gguf_name in modules.items():
            a, b = read[f"{gguf_name}.lora_a"], read[f"{gguf_name}.lora_b"]
            want = model.get_submodule(module_name).get_delta_weight("default").detach().float().numpy()
            if GGUF_ARCHITECTURES[arch_name] == "llama" and module_name.endswith(("q_proj", "k_proj")):
                want = _permute(want, heads if module_name.endswith("q_proj") else kv_heads)
            diff = max(diff, float(np.abs(written_alpha / a.shape[0] * (b @ a) - want).max()))
        if diff >= GGUF_LORA_MAX_DIFF:
            raise PeftkitError(f"export check failed: the adapter GGUF's (alpha/r)·B·A differs from peft's delta weights "
                               f"by {diff:.3g} (limit {GGUF_LORA_MAX_DIFF:g}); nothing was written")
        (tmp / "README.md").write_text(model_card(run_dir, "gguf-lora"), encoding="utf-8")
        result["report"] = ExportReport("lora", diff, 0, str(out / name))
        report = {"finetuning_type": "lora", "format": "gguf-lora", "max_delta_weight_diff": diff, "alpha": alpha,
                  "tensors": len(tensors), "out": str(out / name)}
        (tmp / EXPORT_MARKER).write_text(json.dumps(report, indent=2) + "\n")

    with storage_errors(out, lambda: f"Kept: {out} as it was (nothing of this export was moved into place)"):
        write_dir_atomic(out, fill)
    logger.info("exported the LoRA adapter of %s to %s (%d tensors, max delta-weight difference %.3g)", run_dir,
                result["report"].out, len(tensors), result["report"].max_logit_diff)
    return result["report"]
