"""GRPO's reward functions: the built-ins and users' own, named in `grpo.rewards`.

A reward function takes the prompts (each record's last user message), the completions (the sampled
answers, decoded, without the stop token) and the references (each record's own answer in the data)
as three equal-length lists of strings, and returns one float per completion. The reward of a
completion is the weighted sum of its functions' values.

`grpo.rewards` items: a built-in name (`ner_json_f1`, `exact_match`, `json_valid`, `length_penalty`),
`regex:PATTERN`, or `package.module:function` (imported from the environment or the working
directory); or a mapping {name: ONE_OF_THOSE, weight: W} (weight 1 otherwise).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peftkit.eval.metrics import _pairs, parse_entities

RewardFunction = Callable[[list[str], list[str], list[str]], Sequence[float]]


def ner_json_f1(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """Entity F1 (0..1) of each answer's JSON {type: [entities]} against its reference; 0 for invalid JSON,
    1 when both have no entity."""
    out = []
    for completion, reference in zip(completions, references, strict=True):
        predicted = parse_entities(completion)
        if predicted is None:
            out.append(0.0)
            continue
        pred, gold = _pairs(predicted), _pairs(parse_entities(reference) or {})
        tp, n = sum((pred & gold).values()), sum(pred.values()) + sum(gold.values())
        out.append(1.0 if n == 0 else 2 * tp / n)
    return out


def exact_match(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """1 when the answer equals the reference after stripping whitespace, else 0."""
    return [float(c.strip() == r.strip()) for c, r in zip(completions, references, strict=True)]


def json_valid(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """1 when the whole answer parses as JSON, else 0."""
    def valid(text: str) -> float:
        try:
            json.loads(text.strip())
        except json.JSONDecodeError:
            return 0.0
        return 1.0

    return [valid(c) for c in completions]


def length_penalty(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """−(characters beyond the reference's length) / the reference's length, floored at −1; 0 when the answer
    is no longer than the reference (or there is none). Counters the drift to long answers."""
    return [0.0 if not r else max(-1.0, -max(0, len(c) - len(r)) / len(r))
            for c, r in zip(completions, references, strict=True)]


BUILTINS: dict[str, RewardFunction] = {
    "ner_json_f1": ner_json_f1, "exact_match": exact_match, "json_valid": json_valid, "length_penalty": length_penalty,
}


def regex_reward(pattern: str) -> RewardFunction:
    """1 when `pattern` matches somewhere in the answer (re.search, `.` matching newlines too), else 0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]

    return reward


@dataclass(frozen=True)
class Reward:
    name: str  # as written in the config; the log's rewards/<name>
    function: RewardFunction
    weight: float = 1.0


def _function(name: str) -> RewardFunction:
    if name in BUILTINS:
        return BUILTINS[name]
    if name.startswith("regex:"):
        return regex_reward(name[len("regex:"):])
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{name!r} is neither a built-in ({', '.join(BUILTINS)}), `regex:PATTERN`, "
                         "nor `package.module:function`")
    if os.getcwd() not in sys.path:  # a user's rewards.py beside the config
        sys.path.append(os.getcwd())
    try:
        function = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{name!r}: cannot import it ({e})") from None
    if not callable(function):
        raise ValueError(f"{name!r} is not callable")
    return function


def build_rewards(items: list[Any]) -> tuple[list[Reward], list[str]]:
    """The configured reward functions, and a message per item that is not one (`grpo.rewards[i]: ...`)."""
    rewards, issues = [], []
    for i, item in enumerate(items):
        where = f"grpo.rewards[{i}]"
        if isinstance(item, dict):
            unknown = set(item) - {"name", "weight"}
            if unknown or "name" not in item:
                issues.append(f"{where}: a mapping takes `name` and optional `weight`, got keys {sorted(item)}")
                continue
            name, weight = item["name"], item.get("weight", 1.0)
        else:
            name, weight = item, 1.0
        if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            issues.append(f"{where}: name must be a string and weight a number, got {item!r}")
            continue
        try:
            rewards.append(Reward(name, _function(name), float(weight)))
        except (ValueError, re.error) as e:
            issues.append(f"{where}: {e}")
    return rewards, issues


def score(rewards: list[Reward], prompts: list[str], completions: list[str], references: list[str]) -> Any:
    """(len(completions), len(rewards)) tensor of each function's values; a function that returns the wrong
    number of values or a non-number fails with its name."""
    import torch

    from peftkit.errors import PeftkitError

    columns = []
    for reward in rewards:
        try:
            values = list(reward.function(prompts, completions, references))
        except Exception as e:  # a user's function: name it, without peftkit's traceback around it
            raise PeftkitError(f"reward function {reward.name} failed: {type(e).__name__}: {e}") from e
        if len(values) != len(completions) or not all(isinstance(v, (int, float)) for v in values):
            raise PeftkitError(f"reward function {reward.name} must return {len(completions)} numbers, got {values!r:.200}")
        columns.append(torch.tensor(values, dtype=torch.float32))
    return torch.stack(columns, -1)
