"""Task metrics over generated answers: small pure functions, each unit-tested."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any


def _merge_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    merged: dict[str, object] = {}
    for key, value in pairs:
        previous = merged.get(key)
        if isinstance(previous, list) and isinstance(value, list):
            merged[key] = previous + value
        else:
            merged[key] = value
    return merged


def parse_entities(text: str) -> dict[str, list[str]] | None:
    """A JSON answer {type: [entity, ...]}; None when it does not parse into that shape.

    A type repeated as a key (`{"职位": ["a"], "职位": ["b"]}`, legal JSON that small models
    write) keeps all its entities rather than only the last list, as json.loads alone would.
    """
    try:
        data = json.loads(text.strip(), object_pairs_hook=_merge_duplicate_keys)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    out: dict[str, list[str]] = {}
    for key, values in data.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return None
        out[str(key)] = values
    return out


def _pairs(entities: dict[str, list[str]]) -> Counter:
    return Counter((etype, value) for etype, values in entities.items() for value in values)


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(100 * p, 2), "recall": round(100 * r, 2), "f1": round(100 * f, 2)}


def ner_json(predictions: list[str], references: list[str]) -> dict[str, object]:
    """Entity-level micro precision / recall / F1 (in %) over (type, string) pairs, and per type.

    An unparseable prediction counts as no entities and is counted in `invalid_json`.
    """
    tp: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    n_gold: Counter[str] = Counter()
    invalid = 0
    for pred_text, ref_text in zip(predictions, references, strict=True):
        pred = parse_entities(pred_text)
        if pred is None:
            invalid += 1
            pred = {}
        gold = _pairs(parse_entities(ref_text) or {})
        predicted = _pairs(pred)
        for (etype, _), count in (predicted & gold).items():
            tp[etype] += count
        for (etype, _), count in predicted.items():
            n_pred[etype] += count
        for (etype, _), count in gold.items():
            n_gold[etype] += count
    result: dict[str, object] = {}
    result.update(_prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values())))
    result["invalid_json"] = invalid
    result["per_type"] = {t: _prf(tp[t], n_pred[t], n_gold[t]) for t in sorted(n_gold | n_pred)}
    return result


def exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Share (in %) of predictions equal to the reference after stripping whitespace."""
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return {"exact_match": round(100 * hits / len(references), 2) if references else 0.0}


def _tokens(text: str) -> list[str]:
    """Characters for Chinese, words otherwise (sacrebleu's `zh` tokenizer, used for BLEU and ROUGE alike)."""
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    return TokenizerZh()(text.strip()).split()


def bleu(predictions: list[str], references: list[str]) -> dict[str, object]:
    """Corpus BLEU-4 (sacrebleu), character level for Chinese and word level otherwise."""
    import sacrebleu

    score = sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score
    return {"bleu": round(score, 2)}


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, start=1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    return 2 * overlap / (n_pred + n_ref) if n_pred + n_ref else 0.0


def rouge(predictions: list[str], references: list[str]) -> dict[str, object]:
    """Mean ROUGE-1 / ROUGE-2 / ROUGE-L F1 (in %) over records, on the same tokens as `bleu`."""
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for pred_text, ref_text in zip(predictions, references, strict=True):
        pred, ref = _tokens(pred_text), _tokens(ref_text)
        for n in (1, 2):
            p, r = _ngrams(pred, n), _ngrams(ref, n)
            totals[f"rouge-{n}"] += _f(sum((p & r).values()), sum(p.values()), sum(r.values()))
        totals["rouge-l"] += _f(_lcs(pred, ref), len(pred), len(ref))
    count = max(len(references), 1)
    return {k: round(100 * v / count, 2) for k, v in totals.items()}


def accuracy(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Classification accuracy (in %): the answer, stripped, equals the label."""
    return {"accuracy": exact_match(predictions, references)["exact_match"]}


def f1(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Macro F1 (in %) over the label classes seen in the references."""
    labels = sorted({r.strip() for r in references})
    pairs = [(p.strip(), r.strip()) for p, r in zip(predictions, references, strict=True)]
    scores = []
    for label in labels:
        tp = sum(p == label and r == label for p, r in pairs)
        scores.append(_f(tp, sum(p == label for p, _ in pairs), sum(r == label for _, r in pairs)))
    return {"f1": round(100 * sum(scores) / len(scores), 2) if scores else 0.0}


def classification_scores(predictions: list[int], labels: list[int]) -> dict[str, float]:
    """Class-index predictions (stage cls): accuracy and macro F1 in %, F1 of class 1 when binary (GLUE's MRPC F1),
    and the majority-class accuracy the model has to beat."""
    preds, refs = [str(int(p)) for p in predictions], [str(int(r)) for r in labels]
    out: dict[str, float] = {**accuracy(preds, refs), **f1(preds, refs)}
    if set(refs) <= {"0", "1"}:
        tp = sum(p == r == "1" for p, r in zip(preds, refs))
        out["f1_positive"] = round(100 * _f(tp, preds.count("1"), refs.count("1")), 2)
    if refs:
        out["majority_accuracy"] = round(100 * max(refs.count(c) for c in set(refs)) / len(refs), 2)
    return out


def reference_text(message: Mapping[str, Any]) -> str:
    """A record's answer as metrics read it: its content, or its tool calls as a JSON list of {name, arguments}."""
    calls = message.get("tool_calls")
    if calls:
        return json.dumps([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls],
                          ensure_ascii=False)
    return str(message["content"])


def _call_keys(calls: list[Any]) -> tuple[list[str], list[str]]:
    names = sorted(c.name for c in calls)
    return names, sorted(json.dumps([c.name, c.arguments], sort_keys=True) for c in calls)


def tool_call(predictions: list[str], references: list[str]) -> dict[str, object]:
    """Tool calling (in %), over records whose reference calls tools: the right function names
    (`tool_name_accuracy`) and names with exactly the right arguments (`tool_arguments_exact`), call order
    ignored; `tool_call_valid_json`: of the answers that try to call (a <tool_call> tag or a leading JSON
    object), those whose calls parse; `no_call_accuracy`: records whose reference answers in words and whose
    prediction calls nothing."""
    from peftkit.infer.tools import CALL_TAG, parse_calls, parse_output

    names = exact = calls = attempts = valid = quiet = plain = 0
    for pred_text, ref_text in zip(predictions, references, strict=True):
        _, ref = parse_calls(ref_text)
        pred = parse_output(pred_text, tools=True).calls
        body = parse_output(pred_text, tools=False).content.strip()
        if CALL_TAG in body or body[:1] in "{[" and body:
            attempts += 1
            valid += pred is not None
        if ref is None:
            plain += 1
            quiet += pred is None
            continue
        calls += 1
        if pred is not None:
            (pred_names, pred_full), (ref_names, ref_full) = _call_keys(pred), _call_keys(ref)
            names += pred_names == ref_names
            exact += pred_full == ref_full
    pct = lambda n, d: round(100 * n / d, 2) if d else None  # noqa: E731
    return {"tool_name_accuracy": pct(names, calls), "tool_arguments_exact": pct(exact, calls),
            "tool_call_valid_json": pct(valid, attempts), "no_call_accuracy": pct(quiet, plain),
            "tool_call_records": calls, "tool_call_attempts": attempts}


METRICS: dict[str, Callable[[list[str], list[str]], Mapping[str, object]]] = {
    "ner_json": ner_json,
    "exact_match": exact_match,
    "bleu": bleu,
    "rouge": rouge,
    "accuracy": accuracy,
    "f1": f1,
    "tool_call": tool_call,
}
