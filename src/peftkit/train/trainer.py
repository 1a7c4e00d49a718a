"""PeftTrainer: transformers' Seq2SeqTrainer that knows what `finetuning_type` trained and saves it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import Seq2SeqTrainer
from typing_extensions import override

from peftkit.atomic import write_json_atomic
from peftkit.config.schema import FinetuningArgs
from peftkit.constants import FINETUNING_ARGS_FILE, TRAINING_ARGS_FILE


class PeftTrainer(Seq2SeqTrainer):
    """Saves, per finetuning_type, exactly what trained plus how it was trained.

    lora → adapter_model.safetensors + adapter_config.json (peft's save_pretrained);
    freeze / full → the whole model as safetensors; always the tokenizer, training_args.json and
    finetuning_args.json. transformers' own `_load_best_model` restores all three types
    correctly (tests/unit/test_trainer.py checks the restored weights), so it is not overridden.
    """

    def __init__(self, finetuning_args: FinetuningArgs, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.finetuning_args = finetuning_args

    @override
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        out = Path(output_dir or self.args.output_dir)
        write_json_atomic(out / TRAINING_ARGS_FILE, json.loads(self.args.to_json_string()))
        write_json_atomic(out / FINETUNING_ARGS_FILE, asdict(self.finetuning_args))
