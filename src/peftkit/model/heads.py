"""The heads a stage trains (the stage table names them): the causal LM's own, a value head beside it (rm), and a
sequence classifier over the training data's classes (cls). Each says how it loads, trains, is restored from a run
and exports; nothing else in peftkit tests a head's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.constants import VALUE_HEAD_FILE
from peftkit.stages import stage as stage_of


class Head:
    """The causal LM's own output layer (sft, pt, dpo, kto, grpo): nothing beside the model."""

    name = "lm"
    classes = False  # sized by the training data's classes (data_report.json)
    token_loss = True  # the model's own loss is a sum over supervised tokens (Trainer scales it for accumulation)
    gguf = True  # llama.cpp runs it: GGUF export is open to it
    end_of_turn = True  # trained answers end with the template's end of turn (a class label has none)
    task_type = "CAUSAL_LM"  # peft's TaskType for LoRA
    lora_exclude: list[str] | None = None  # modules LoRA must not wrap (they train in full)
    files: tuple[str, ...] = ()  # the head's own files beside a run's weights: an export carries them along

    def auto_class(self, config: Any = None) -> Any:
        """The transformers class that loads this head's model (and its export): an image-text checkpoint (its
        `config`) as the image-text model it is, so images reach its vision tower (text data works too)."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        from peftkit.model.families import is_image_text

        return AutoModelForImageTextToText if config is not None and is_image_text(config) else AutoModelForCausalLM

    def config_kwargs(self, classes: list[str] | None) -> dict[str, Any]:
        """from_pretrained's keywords that shape the head (a classifier's labels)."""
        return {}

    def attach(self, model: Any) -> Any:
        """A fresh head on a newly loaded model (seeded by the caller's seed)."""
        return model

    def restore(self, model: Any, run: Path) -> None:
        """The head a trained run saved, put on its freshly loaded base (before the adapter)."""

    def trained_in_full(self, model: Any) -> list[str]:
        """Modules that train in full beside LoRA (peft's modules_to_save)."""
        return []

    def freeze_names(self, model: Any) -> list[str]:
        """Parameters that freeze tuning trains beside the chosen layers."""
        return []

    def prepare(self, model: Any, previous: str | None) -> None:
        """After finetuning_type is applied: make the head trainable, from `previous` (the last adapter trained on)."""


class ValueHead(Head):
    """rm: one linear layer from the last hidden state to a score (model/value_head.py), trained in full; saved as
    value_head.safetensors beside the adapter or weights, and carried along by the export."""

    name = "value"
    token_loss = False
    gguf = False
    files = (VALUE_HEAD_FILE,)

    @property
    def lora_exclude(self) -> list[str] | None:  # type: ignore[override]
        from peftkit.model.value_head import HEAD

        return [HEAD]

    def attach(self, model: Any) -> Any:
        from peftkit.model.value_head import attach_value_head

        return attach_value_head(model)

    def restore(self, model: Any, run: Path) -> None:
        from peftkit.model.value_head import load_value_head

        load_value_head(model, run)

    def prepare(self, model: Any, previous: str | None) -> None:
        from peftkit.model.value_head import ensure_value_head, load_value_head

        if previous and (Path(previous) / VALUE_HEAD_FILE).is_file():
            load_value_head(model, previous)
        ensure_value_head(model).requires_grad_(True)


# Classification heads of AutoModelForSequenceClassification models: always trained in full.
CLASSIFIER_HEADS = ("classifier", "score")
# BERT-style poolers feed the classifier; sentence-embedding encoders (MiniLM) never trained theirs.
POOLERS = ("pooler",)


class ClassifierHead(Head):
    """cls: AutoModelForSequenceClassification over the training data's classes, its head (and an encoder's pooler)
    trained in full under every finetuning_type; a decoder reads its score at the last non-padding token."""

    name = "classifier"
    classes = True
    token_loss = False
    gguf = False
    end_of_turn = False
    task_type = "SEQ_CLS"  # peft trains the classification head in full

    def auto_class(self, config: Any = None) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def config_kwargs(self, classes: list[str] | None) -> dict[str, Any]:
        classes = classes or []
        return {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
                "label2id": {c: i for i, c in enumerate(classes)}}

    def trained_in_full(self, model: Any) -> list[str]:
        """The pooler too: on MRPC with MiniLM, 82% dev accuracy with it, the majority class without."""
        return [p for p in POOLERS if any(n.split(".")[-1] == p for n, _ in model.named_modules())]

    def freeze_names(self, model: Any) -> list[str]:
        return [n for n, _ in model.named_parameters()
                if n.split(".")[0] in CLASSIFIER_HEADS or any(f"{p}." in n for p in POOLERS)]


HEADS: dict[str, Head] = {h.name: h for h in (Head(), ValueHead(), ClassifierHead())}


def head_of(stage: str) -> Head:
    """The head the stage table gives `stage`."""
    return HEADS[stage_of(stage).head]


def sums_tokens(stage: str) -> bool:
    """The stage's loss is its model's own sum over supervised tokens, which Trainer scales for gradient accumulation
    itself; otherwise (an objective, or a classifier) a mean over pairs or records."""
    return stage_of(stage).objective is None and head_of(stage).token_loss
