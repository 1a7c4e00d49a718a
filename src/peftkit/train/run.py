"""`peftkit train`: config → tokenizer → data → model → trainer → train → save → predict. Read top to bottom.

The same code runs in one process or under torchrun / accelerate launch: the main process prepares
the data first (the others read its cache) and is the only one that writes files.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from peftkit.atomic import storage_errors, write_json_atomic
from peftkit.config import RunConfig, build_training_arguments, dump_config
from peftkit.config.load import to_dict, trackers, train_extras
from peftkit.constants import DATA_REPORT_FILE, RUN_SUMMARY_FILE
from peftkit.data import PreparedData, apply_template, build_collator, prepare_data
from peftkit.errors import ConfigError, PeftkitError
from peftkit.eval.predict import predict
from peftkit.model import load_stage_model, load_tokenizer, prepare_for_training
from peftkit.model.attention import choose_attention, flattens
from peftkit.model.dtypes import training_dtype, upcast_trainable
from peftkit.model.families import packing_proven
from peftkit.model.finetuning import (
    CONVERTED_INITS,
    LORA_INIT_DIR,
    save_initial_adapter,
)
from peftkit.model.loading import load_processor
from peftkit.objectives.build import build_objective
from peftkit.rundir import config_file
from peftkit.stages import stage as stage_of
from peftkit.train.allocator import keep_freed_memory
from peftkit.train.callbacks import LogCallback, StopCallback, TimeBudget, TrackerConfig, swanlab_callback
from peftkit.train.checkpoints import config_differences, latest_complete, resolve_resume
from peftkit.train.isolation import check_packed_isolation
from peftkit.train.objectives import eval_metrics
from peftkit.train.plot import plot_loss
from peftkit.train.progress import Progress
from peftkit.train.runlock import RunLock
from peftkit.train.signals import GracefulStop
from peftkit.train.trainer import PeftTrainer, preprocess_logits_for_accuracy

logger = logging.getLogger("peftkit")


# accelerate (1.15) switches to FSDP only for accelerator process groups (AcceleratorState: MULTI_GPU / NPU / XPU ...,
# not MULTI_CPU): on CPUs a run with train.fsdp would silently be DDP, every process holding the whole model.
FSDP_ON_CPU = ("train.fsdp: FSDP runs on GPUs (or other accelerators) only; on CPUs accelerate silently trains with DDP "
               "instead (each process holds the whole model). Remove train.fsdp / fsdp_config to run DDP on CPUs "
               "(peftkit train --nproc N), or run on GPUs")


class Interrupted(PeftkitError):
    """Training stopped on SIGINT / SIGTERM after saving a checkpoint, or because another rank went away."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainResult:
    """What a run produced: its summary (also in run_summary.json) and the trained in-memory model."""

    summary: dict[str, Any]
    model: Any


def train(cfg: RunConfig, resume_command: str = "peftkit train CONFIG.yaml train.resume_from_checkpoint=true") -> TrainResult:
    """Fine-tune as configured; the summary holds output_dir, losses, metrics before/after, wall time.

    `resume_command` is the shell command that resumes this very run, printed when it is interrupted.
    Only the main process writes, and it holds the output_dir's RunLock for the whole run.
    """
    from peftkit.model.quantization import quantized_base
    from peftkit.train.preflight import preflight

    preflight(cfg)
    args = build_training_arguments(cfg.train, cfg.stage, quantized=quantized_base(cfg.model))
    if args.fsdp and args.device.type == "cpu":
        raise ConfigError([FSDP_ON_CPU])
    with RunLock(Path(args.output_dir)) if args.should_save else contextlib.nullcontext():
        return _train(cfg, args, resume_command)


def _train(cfg: RunConfig, args: Any, resume_command: str) -> TrainResult:
    from transformers import set_seed

    start = time.time()
    set_seed(args.seed)  # before the adapter is created: its initialisation must not depend on what ran before
    if args.device.type == "cpu" and train_extras(cfg.train).peftkit_speedups != "off":
        keep_freed_memory()  # each step's activations reuse the heap instead of fresh pages (train/allocator.py)
    resume = _start_run(cfg, args, resume_command)
    tokenizer, data = _prepare_data(cfg, args)
    model, summary = _prepare_model(cfg, args, tokenizer, data, resume)
    trainer = build_trainer(cfg, args, model, tokenizer, data, resume)
    result = _fit(trainer, resume, resume_command)
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    summary.update(train_loss=result.training_loss, train_seconds=round(result.metrics["train_runtime"], 1))
    return _finish(cfg, args, model, tokenizer, summary, start)


def _start_run(cfg: RunConfig, args: Any, resume_command: str) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); the run's config.yaml written."""
    output_dir = Path(args.output_dir)
    with args.main_process_first(desc="checking checkpoints"):
        resume = resolve_resume(output_dir, train_extras(cfg.train), resume_command)
    if args.should_save and resume is not None:
        _check_same_config(cfg, config_file(output_dir))
    if args.should_save:
        dump_config(cfg, config_file(output_dir))
    if resume is not None:
        logger.info("resuming from %s", resume)
    return resume


def _prepare_data(cfg: RunConfig, args: Any) -> tuple[Any, PreparedData]:
    tokenizer = load_tokenizer(cfg.model)
    apply_template(tokenizer, cfg.data.template, cfg.stage)
    processor = load_processor(cfg.model)  # an image-text model's: records with images are encoded through it
    with args.main_process_first(desc="preparing data"):  # the others then read the main process's cache
        data = prepare_data(cfg.data, tokenizer, cfg.stage, processor)
    if args.should_save:
        write_json_atomic(Path(args.output_dir) / DATA_REPORT_FILE, data.report.as_dict())
        logger.info("data:\n%s\nexample (supervised spans in [[...]]):\n%s", data.report.summary(), data.report.example)
    return tokenizer, data


def _prepare_model(cfg: RunConfig, args: Any, tokenizer: Any, data: PreparedData,
                   resume: Path | None) -> tuple[Any, dict[str, Any]]:
    """The model with the stage's head, scored before training if asked, then made trainable."""
    output_dir = Path(args.output_dir)
    from peftkit.model.quantization import estimate_memory

    estimate = estimate_memory(cfg.model)
    if estimate is not None:
        logger.info(estimate.line())
    on_cuda = args.device.type == "cuda"
    attn = choose_attention(cfg.model.attn_implementation, cfg.data.packing and stage_of(cfg.stage).packing, on_cuda)
    load_args = replace(cfg.model, attn_implementation=attn,
                        dtype=training_dtype(cfg.model.dtype, cfg.train, on_cuda))  # type: ignore[arg-type]
    model = load_stage_model(load_args, cfg.stage, data.report.classes, tokenizer.pad_token_id)
    packs = cfg.data.packing and stage_of(cfg.stage).packing
    if packs and not packing_proven(model.config):  # a family the tier has not run: checked on the model itself
        check_packed_isolation(model, build_collator(tokenizer, True, None, cfg.stage,
                                                     flatten=flattens(model.config._attn_implementation)))
    summary: dict[str, Any] = {"output_dir": str(output_dir), "stage": cfg.stage}
    model = prepare_for_training(model, cfg.finetuning, cfg.stage, args.gradient_checkpointing,
                                 args.gradient_checkpointing_kwargs)
    if load_args.dtype != cfg.model.dtype:
        upcast_trainable(model)
        logger.info("weights: frozen in %s, trained in float32; attention: %s", load_args.dtype,
                    model.config._attn_implementation)
    if cfg.eval.dataset and cfg.eval.before_training and args.should_save and resume is None:
        # after the adapters of finetuning.adapter_name_or_path are loaded: "before" is the model training starts
        # from (a new LoRA adapter starts at B = 0, so it is the base model's output)
        before = cfg.eval.before_training
        before_cfg = replace(cfg, eval=replace(cfg.eval, max_samples=before if before is not True else cfg.eval.max_samples))
        summary["metrics_before"] = predict(model, tokenizer, before_cfg, output_dir, tag="_before")
    converted_init = cfg.finetuning.init_lora_weights in CONVERTED_INITS and not cfg.finetuning.adapter_name_or_path
    if converted_init and args.should_save and not (output_dir / LORA_INIT_DIR).is_dir():  # a resumed run keeps the first run's
        save_initial_adapter(model, output_dir / LORA_INIT_DIR)
    return model, summary


def _fit(trainer: PeftTrainer, resume: Path | None, resume_command: str) -> Any:
    """trainer.train with a clean stop on SIGINT / SIGTERM, an `error` log line on failure, and the final save."""
    output_dir = Path(str(trainer.args.output_dir))
    log = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LogCallback))

    def kept() -> str:  # for a failed write: what survives it
        return f"Kept: {latest_complete(output_dir) or 'no complete checkpoint'} (incomplete ones are never resumed from)"

    with GracefulStop() as stop, storage_errors(output_dir, kept):
        trainer.add_callback(StopCallback(stop, log))
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except BaseException as e:
            status = "aborted" if isinstance(e, KeyboardInterrupt) else "error"
            with contextlib.suppress(OSError):  # the disk may be what failed: keep the original error
                log.write(trainer.state, "error", status=status, message=f"{type(e).__name__}: {e}"[:1000])
            if _peer_failure(e, trainer.args.world_size):
                raise Interrupted(
                    f"another process of this run stopped (a node or process failed: {str(e).splitlines()[0][-160:]}) "
                    f"at step {trainer.state.global_step}; the last complete checkpoint is "
                    f"{latest_complete(output_dir)}. Start every node again with: {resume_command}", 1) from e
            raise
    if stop.signal is not None:
        raise Interrupted(
            f"training stopped at step {trainer.state.global_step} of {trainer.state.max_steps}; the checkpoint is "
            f"{latest_complete(output_dir)}. Resume with: {resume_command}",
            stop.exit_code,
        )
    with storage_errors(output_dir, kept):
        trainer.save_model()
        trainer.save_state()
    return result


def _peer_failure(e: BaseException, world_size: int) -> bool:
    """Whether a collective failed because another rank went away (gloo / NCCL report it as a RuntimeError):
    this process then stops with the resume command instead of a traceback."""
    import torch.distributed as dist

    if world_size < 2:
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("Connection reset by peer", "Connection closed by peer",
                                                                   "NCCL communicator was aborted", "gloo"))


def _finish(cfg: RunConfig, args: Any, model: Any, tokenizer: Any, summary: dict[str, Any], start: float) -> TrainResult:
    """The loss plot, the evaluation after training and run_summary.json (main process only).

    `model` is the plain model accelerate wrapped for autocast, so what is computed here matches a
    reload of the saved folder (generation applies its own autocast).
    """
    output_dir = Path(args.output_dir)
    if args.should_save and plot_loss(output_dir) is None:
        logger.info("no training_loss.png: no loss was logged (train.logging_steps is larger than the steps run)")
    if cfg.eval.dataset and args.should_save:
        summary["metrics_after"] = predict(model, tokenizer, cfg, output_dir)
    summary["wall_seconds"] = round(time.time() - start, 1)
    if args.should_save:
        write_json_atomic(output_dir / RUN_SUMMARY_FILE, summary)
    return TrainResult(summary, model)


def _check_same_config(cfg: RunConfig, saved: Path) -> None:
    """A resumed run must be the run it continues: refuse any difference but the resume keys."""
    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PeftkitError(f"{saved}: cannot be read ({e}); it records the run being resumed") from e
    new = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
    diff = config_differences(old, new)
    if diff:
        raise PeftkitError(f"resuming {saved.parent} with a config that differs from the one it was trained with "
                           f"({saved}):\n  " + "\n  ".join(diff) + "\nresume with the same config and overrides, "
                           "or start a new run in another train.output_dir")


def build_trainer(cfg: RunConfig, args: Any, model: Any, tokenizer: Any, data: PreparedData,
                  resume: Path | None = None) -> PeftTrainer:
    """The PeftTrainer for the stage: its collator, objective and eval metrics; token counts (restored from
    `resume`), the log, early stopping."""
    from transformers import EarlyStoppingCallback

    extras, entry = train_extras(cfg.train), stage_of(cfg.stage)
    progress = Progress(tokenizer.pad_token_id, resume)
    callbacks: list[Any] = [progress, LogCallback(str(resume) if resume else None, progress.base.real_tokens),
                            TrackerConfig(to_dict(cfg))]
    if "swanlab" in trackers(cfg.train):
        callbacks.insert(0, swanlab_callback(Path(cfg.train["output_dir"]).name))
    if extras.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(extras.early_stopping_patience, extras.early_stopping_threshold))
    if extras.max_train_minutes:
        callbacks.append(TimeBudget(extras.max_train_minutes))
    objective = build_objective(cfg.stage, model, cfg, tokenizer=tokenizer)
    metrics = eval_metrics(objective) if objective is not None else entry.load("metrics")
    has_eval = data.eval is not None
    fixed_shape = (args.per_device_train_batch_size, cfg.data.cutoff_len) if args.torch_compile else None
    return PeftTrainer(
        finetuning_args=cfg.finetuning,
        progress=progress,
        chunked_loss=extras.chunked_loss,
        stage=cfg.stage,
        objective=objective,
        speedups=extras.peftkit_speedups,
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=build_collator(tokenizer, cfg.data.packing, fixed_shape, cfg.stage,
                                     flatten=cfg.data.packing and flattens(model.config._attn_implementation),
                                     processor=data.processor),
        processing_class=data.processor or tokenizer,  # saved with each checkpoint: a processor's files load too
        callbacks=callbacks,
        compute_metrics=metrics if has_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_accuracy if has_eval and objective is None else None,
    )
