"""The stage table: every fact that differs between training stages, in one place.

Each consumer (config checks, data encoding, batching, model heads, the trainer, evaluation, chat,
export) reads the stage's entry here instead of testing its name. Adding a stage is one `Stage`
entry plus its encoder and objective (see tests/unit/test_stage_table.py for a stage added in a test).

The callables are named as "module:function" (or given directly) and imported on first use: the table is imported by
config and data code that must not import the trainer, and an Encoding holding a stage name stays
picklable for worker processes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from peftkit.errors import ConfigError

HeadName = Literal["lm", "value", "classifier"]  # model/heads.py: what each one does
Target = str | Callable[..., Any]  # "module:function", or the callable itself


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    # Record formats it trains on (data/formats.py); None: any conversational format.
    formats: tuple[str, ...] | None
    # (tokenizer, samples, wheres, Encoding) -> the examples of each sample (data/encode.py).
    encoder: Target
    # (tokenizer) -> the collator of records one by one (data/collate.py, or transformers': its label padding,
    # -100, is IGNORE_INDEX); packed rows of a `packing` stage are always batched by data/collate.py's PackedCollator.
    collator: Target
    # lm: the causal LM's own head; value: a value head beside it; classifier: AutoModelForSequenceClassification
    # with the training data's classes (model/heads.py says how each loads, trains and exports).
    head: HeadName = "lm"
    # (model, RunConfig, reference, tokenizer) -> the stage's loss (objectives/build.py, train/objectives.py for grpo);
    # None: the model's own loss.
    objective: Target | None = None
    # Trainer's compute_metrics when there is no objective (an objective brings pair metrics).
    metrics: Target = "peftkit.train.trainer:token_accuracy"
    # (model, tokenizer, cfg, output_dir, tag) -> metrics (eval/scoring.py); None: generate and score eval.metrics.
    scorer: Target | None = None
    chat_template: bool = True  # False: documents / texts, the tokenizer need not have a chat template
    packing: bool = False  # data.packing allowed (only where the loss is a sum over tokens)
    streaming: bool = True  # False: the stage needs the whole training data up front (cls: its classes)
    pairs: bool = False  # records are (chosen, rejected) pairs, batched chosen rows first
    rewards: bool = False  # trains on sampled answers scored by the reward functions of `grpo.rewards`

    def load(self, role: Literal["encoder", "collator", "objective", "metrics", "scorer"]) -> Callable[..., Any]:
        """The callable this stage names for `role` (imported on first use; a callable is taken as it is)."""
        target = getattr(self, role)
        if target is None:
            raise ValueError(f"stage {self.name} has no {role}")
        if callable(target):
            return target
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)


_ENCODE = "peftkit.data.encode"
_COLLATE = "peftkit.data.collate"
_OBJECTIVES = "peftkit.train.objectives"
_PAIR_OBJECTIVES = "peftkit.objectives.build"  # the objectives eval scores with (below train)

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", "supervised fine-tuning on conversations", None,
          f"{_ENCODE}:encode_samples", "transformers:DataCollatorForSeq2Seq", packing=True),
    Stage("pt", "continued pre-training on documents", ("text",),
          f"{_ENCODE}:encode_samples", "transformers:DataCollatorForSeq2Seq", chat_template=False, packing=True),
    Stage("rm", "reward model (value head, pairwise loss)", ("preference",),
          f"{_ENCODE}:encode_preferences", f"{_COLLATE}:PairCollator", head="value",
          objective=f"{_PAIR_OBJECTIVES}:pairwise_reward", scorer="peftkit.eval.scoring:score_pairs", pairs=True),
    Stage("dpo", "direct preference optimisation", ("preference",),
          f"{_ENCODE}:encode_preferences", f"{_COLLATE}:PairCollator",
          objective=f"{_PAIR_OBJECTIVES}:direct_preference", scorer="peftkit.eval.scoring:score_pairs", pairs=True),
    Stage("kto", "Kahneman-Tversky optimisation on unpaired desirable / undesirable answers",
          ("sharegpt", "messages", "alpaca", "preference"),
          f"{_ENCODE}:encode_unpaired", f"{_COLLATE}:UnpairedCollator",
          objective=f"{_PAIR_OBJECTIVES}:unpaired_preference", scorer="peftkit.eval.scoring:score_judged"),
    Stage("grpo", "group relative policy optimisation: sampled answers scored by reward functions",
          ("alpaca", "sharegpt", "messages", "preference"),
          f"{_ENCODE}:encode_prompts", f"{_COLLATE}:PromptCollator", objective=f"{_OBJECTIVES}:group_relative",
          rewards=True),
    Stage("cls", "sequence classification", ("pairs",),
          f"{_ENCODE}:encode_classification", "transformers:DataCollatorWithPadding", head="classifier",
          metrics="peftkit.train.trainer:class_metrics", scorer="peftkit.eval.scoring:classify",
          chat_template=False, streaming=False),
)}


def stage(name: str) -> Stage:
    """The table entry of `name`; a ConfigError listing the stages otherwise."""
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError([f"stage={name!r}: must be one of {', '.join(STAGES)}"]) from None
