"""`peftkit export`: one self-contained folder that plain transformers loads, checked before it lands.

LoRA runs are merged into the base weights (in float64, cast once to the stored dtype); freeze / full runs are
copied. A cls run exports a sequence-classification folder; an rm run keeps value_head.safetensors beside
the merged causal LM. The folder is written
under a temporary name, reloaded and compared with the run (logits and chat-template tokens), and
only then renamed into place, so a failed check or a crash never leaves a half or stale export.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.atomic import storage_errors, write_dir_atomic
from peftkit.config.load import dataset_specs
from peftkit.config.schema import ModelArgs
from peftkit.data.dataset import Dialogue, conversations
from peftkit.data.encode import encode_messages
from peftkit.data.render import render_prompt
from peftkit.errors import PeftkitError
from peftkit.export.hub import model_card
from peftkit.model.families import GGUF_ARCHITECTURES, float64_load_kwargs, gguf_refusal
from peftkit.model.heads import head_of
from peftkit.model.loading import load_trained
from peftkit.model.quantization import prequantized
from peftkit.rundir import Run, read_run
from peftkit.stages import Stage
from peftkit.stages import stage as stage_of

logger = logging.getLogger("peftkit")

# The check runs in float64: in float32 the same merged weights differ from base + adapter by up to
# ~1e-4 on SmolLM2 from summation order alone (9.7e-5 measured, even merged in memory), which
# would make a 1e-4 limit a coin toss; in float64 what remains is the export's own rounding.
MAX_LOGIT_DIFF = 1e-4
EXPORT_MARKER = "export_report.json"  # written last into every export: a folder that has it may be replaced
_CHECK_PROMPTS = ["Hello! Who are you?", "高勇：男，中国国籍，无境外居留权，"]


@dataclass
class ExportReport:
    """What the checks measured; written as export_report.json inside the export."""

    finetuning_type: str
    max_logit_diff: float
    records_checked: int
    out: str


def _model_config(run: Run) -> Any:
    """The transformers config of the model the run's weights make (the base's for a LoRA run)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(run.base_model)


def _load_run(run: Run, entry: Stage, pad_token_id: int | None) -> tuple[Any, Any]:
    """The run in float64 (base + adapter for lora), and the dtype its weights are stored in."""
    import torch
    from transformers import AutoConfig

    run_dir, path = run.path, run.base_model  # the base of a LoRA run; the run folder itself for freeze / full
    if run.is_adapter:
        method = prequantized(path)
        if method:  # a QLoRA run with model.quantization_bit has an unquantized base on disk: that one merges
            raise PeftkitError(
                f"{run_dir}: its base {path} is a quantized checkpoint ({method}); merging LoRA into quantized "
                "weights would round much of the update away, so the export is refused. Serve the adapter on that "
                "base as it is (peftkit serve --adapter, or vLLM), or point adapter_config.json's "
                "base_model_name_or_path at the unquantized original and export again")
    config = AutoConfig.from_pretrained(path)
    stored = getattr(torch, str(config.dtype).replace("torch.", "")) if config.dtype else torch.float32
    model = load_trained(ModelArgs(name_or_path=path), run_dir, entry.name, run.is_adapter, pad_token_id,
                         restore_head=False, dtype=torch.float64, **float64_load_kwargs(config))  # Head.files: copied
    if model.config.pad_token_id is None:  # the export's config names the pad token, whatever the head
        model.config.pad_token_id = pad_token_id
    return model, stored


def _check_prompts(tokenizer: Any, entry: Stage) -> list[list[int]]:
    if not entry.chat_template or not tokenizer.chat_template:  # texts (cls, pt): no chat template to render
        return [tokenizer(text)["input_ids"] for text in _CHECK_PROMPTS]
    return [render_prompt(tokenizer, [{"role": "user", "content": text}]) for text in _CHECK_PROMPTS]


def _logits(model: Any, prompts: list[list[int]]) -> list[Any]:
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0] for ids in prompts]


def _training_records(run: Run, limit: int) -> list[Dialogue]:
    """The first training records, read as the run read them (its config.yaml), if the files still exist."""
    args = run.data
    if args is None:
        return []
    specs = [s for s in dataset_specs(args, "train")[0] if Path(s.path).exists()]
    return conversations(specs[0], args, limit) if specs else []


def _check_template(run_tokenizer: Any, exported: Any, records: list, cutoff_len: int) -> None:
    """The exported tokenizer (or the folder holding it) renders each training record to the run's tokens."""
    from transformers import AutoTokenizer

    if isinstance(exported, Path):
        exported = AutoTokenizer.from_pretrained(exported)
    for messages, where, tools in records:
        a, _ = encode_messages(run_tokenizer, messages, cutoff_len, where, tools=tools)
        b, _ = encode_messages(exported, messages, cutoff_len, where, tools=tools)
        if a != b:
            raise PeftkitError(
                f"export check failed: the exported tokenizer renders {where[0]} record {where[1]} differently "
                "from training (chat template or tokenizer changed); the export was not written"
            )


def check_destination(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an `out` whose replacement would lose what the user did not ask to replace.

    Allowed: a new path, an empty folder, or a previous peftkit export (it holds EXPORT_MARKER);
    anything else only with `overwrite`. Never the run itself, a folder inside it or above it, the
    working directory or the home folder (or any folder above them), whatever the flag says.
    """
    run, target = run_dir.resolve(), out.resolve()
    protected = {"the run being exported": run, "the working directory": Path.cwd().resolve(),
                 "the home folder": Path.home().resolve()}
    if target == run or run in target.parents:
        raise PeftkitError(f"--out {out}: inside the run being exported ({run_dir}); choose a folder outside it")
    for what, path in protected.items():
        if target == path or target in path.parents:
            raise PeftkitError(f"--out {out}: replacing it would delete {what} ({path}); choose a new folder")
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise PeftkitError(f"--out {out}: exists and is not a folder; choose a new path")
    if overwrite or not any(target.iterdir()) or (target / EXPORT_MARKER).is_file():
        return
    raise PeftkitError(f"--out {out}: the folder holds files that are not a peftkit export; choose a new folder, "
                       "or pass --overwrite to replace it whole")


@dataclass
class _Merged:
    """A run loaded for export: the merged model in float64, its stored dtype, and what the checks compare with."""

    finetuning_type: str
    entry: Stage
    tokenizer: Any
    model: Any
    stored_dtype: Any
    prompts: list[list[int]]
    reference: list[Any]  # the run's logits on `prompts` (base + adapter, before merging)
    records: list[Dialogue]  # training records whose rendering is re-checked


def _merged(run: Run) -> _Merged:
    from transformers import AutoTokenizer

    finetuning_type, entry = run.finetuning_type, stage_of(run.stage)
    tokenizer = AutoTokenizer.from_pretrained(run.path)
    model, stored_dtype = _load_run(run, entry, tokenizer.pad_token_id)
    prompts = _check_prompts(tokenizer, entry)
    reference = _logits(model, prompts)
    if finetuning_type == "lora":
        model = model.merge_and_unload()  # in float64: the only rounding is the final cast
    records = _training_records(run, limit=16) if entry.chat_template else []
    return _Merged(finetuning_type, entry, tokenizer, model, stored_dtype, prompts, reference, records)


def _max_diff(reference: list[Any], model: Any, prompts: list[list[int]]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(reference, _logits(model, prompts)))


def export(run_dir: str | Path, out: str | Path, max_shard_size: str = "2GB", overwrite: bool = False) -> ExportReport:
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
    run = _merged(trained)
    model = run.model.to(run.stored_dtype)
    result: dict[str, ExportReport] = {}

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        run.tokenizer.save_pretrained(tmp)
        head = head_of(run.entry.name)
        for extra in head.files:  # rm's value head, carried along
            if (run_dir / extra).is_file():
                shutil.copy2(run_dir / extra, tmp / extra)
        reloaded = head.auto_class().from_pretrained(tmp, dtype=torch.float64, **float64_load_kwargs(model.config))
        diff = _max_diff(run.reference, reloaded, run.prompts)
        if diff >= MAX_LOGIT_DIFF:
            raise PeftkitError(
                f"export check failed: reloaded logits differ from the run's by {diff:.2e} (limit {MAX_LOGIT_DIFF:g}); "
                "the export was not written"
            )
        _check_template(run.tokenizer, tmp, run.records, cutoff_len=4096)
        (tmp / "README.md").write_text(model_card(run_dir, "transformers"), encoding="utf-8")
        result["report"] = ExportReport(run.finetuning_type, diff, len(run.records), str(out))
        (tmp / EXPORT_MARKER).write_text(json.dumps(result["report"].__dict__, indent=2) + "\n")

    with storage_errors(out, lambda: f"Kept: {out} as it was (nothing of this export was moved into place)"):
        write_dir_atomic(out, fill)
    report = result["report"]
    logger.info("exported %s run to %s (max logit difference %.2e, %d training records re-rendered identically)",
                run.finetuning_type, out, report.max_logit_diff, len(run.records))
    return report


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
    refusal = gguf_refusal(_model_config(trained)) or tokenizer_refusal(tokenizer_home)  # before any merging
    if refusal:
        raise PeftkitError(refusal)
    check_destination(run_dir, out, overwrite)
    run = _merged(trained)
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
        diff = _max_diff(run.reference, reloaded, run.prompts)
        limit = GGUF_MAX_LOGIT_DIFF[quant]
        if diff >= limit:
            raise PeftkitError(f"export check failed: the GGUF file's logits differ from the run's by {diff:.3g} "
                               f"(limit {limit:g} for {quant}); the export was not written")
        exported = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
        _check_template(run.tokenizer, exported, run.records, cutoff_len=4096)
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
    refusal = gguf_refusal(_model_config(trained))
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
