"""Task metrics: entity-level P/R/F1 over JSON answers, exact match."""

from __future__ import annotations

import pytest

from peftkit.eval.metrics import accuracy, bleu, exact_match, f1, ner_json, parse_entities, rouge

GOLD = '{"姓名": ["高勇"], "国籍": ["中国国籍"], "职位": ["工程师", "会员"]}'


def test_perfect_answer() -> None:
    m = ner_json([GOLD], [GOLD])
    assert (m["precision"], m["recall"], m["f1"], m["invalid_json"]) == (100.0, 100.0, 100.0, 0)


def test_partial_answer_counts_pairs_of_type_and_string() -> None:
    # 2 right (姓名 高勇, 职位 工程师), 1 wrong type (组织名 会员), 1 missing; 3 predicted, 4 gold.
    pred = '{"姓名": ["高勇"], "职位": ["工程师"], "组织名": ["会员"]}'
    m = ner_json([pred], [GOLD])
    assert m["precision"] == pytest.approx(66.67)
    assert m["recall"] == 50.0
    assert m["f1"] == pytest.approx(57.14)
    assert m["per_type"]["组织名"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert m["per_type"]["姓名"]["f1"] == 100.0


def test_duplicates_count_once_each() -> None:
    m = ner_json(['{"职位": ["会员", "会员"]}'], ['{"职位": ["会员"]}'])
    assert (m["precision"], m["recall"]) == (50.0, 100.0)


def test_unparseable_answer_is_no_entities_and_counted() -> None:
    m = ner_json(["姓名：高勇", '{"姓名": "高勇"}', GOLD], [GOLD, GOLD, GOLD])
    assert m["invalid_json"] == 2
    assert m["precision"] == 100.0 and m["recall"] == pytest.approx(33.33)


def test_parse_entities_shape() -> None:
    assert parse_entities(' {"a": ["x"]} ') == {"a": ["x"]}
    assert parse_entities("[1]") is None
    assert parse_entities('{"a": [1]}') is None


def test_repeated_type_keys_keep_all_entities() -> None:
    assert parse_entities('{"职位": ["董事"], "职位": ["总经理"]}') == {"职位": ["董事", "总经理"]}


def test_exact_match() -> None:
    assert exact_match(["a ", "b"], ["a", "c"]) == {"exact_match": 50.0}


def test_bleu_is_character_level_for_chinese() -> None:
    assert bleu(["我爱北京天安门"], ["我爱北京天安门"])["bleu"] == 100.0
    # Without character splitting this would be a 0 (one "word" each, different).
    assert 0 < bleu(["我爱北京天安门广场"], ["我爱北京天安门"])["bleu"] < 100


def test_rouge_by_hand() -> None:
    # pred "a b c", ref "a b d": unigrams 2/3 overlap -> F1 2/3; bigrams {ab,bc} vs {ab,bd} -> 1/2; LCS "a b" -> 2/3.
    assert rouge(["a b c"], ["a b d"]) == {"rouge-1": 66.67, "rouge-2": 50.0, "rouge-l": 66.67}
    assert rouge(["高勇男"], ["高勇"])["rouge-1"] == 80.0  # characters: 2 overlap, 3 + 2 tokens


def test_accuracy_and_macro_f1() -> None:
    preds, refs = ["1", "0", "1", "1"], ["1", "0", "0", "1"]
    assert accuracy(preds, refs) == {"accuracy": 75.0}
    # class 1: p 2/3 r 1 -> 0.8; class 0: p 1 r 1/2 -> 0.667; macro 73.33
    assert f1(preds, refs) == {"f1": 73.33}


def test_tool_call_metric() -> None:
    from peftkit.eval.metrics import reference_text, tool_call

    ref = reference_text({"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]})
    assert ref == '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]'
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}\n</tool_call>'  # key order
    wrong_args = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>'
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>'
    words = "It is sunny."
    m = tool_call([call, wrong_args, broken, words, words, call], [ref, ref, ref, ref, words, words])
    assert m == {"tool_name_accuracy": 50.0, "tool_arguments_exact": 25.0,  # 2 / 4 names, 1 / 4 exact
                 "tool_call_valid_json": 75.0,  # 4 answers try to call, 3 parse
                 "no_call_accuracy": 50.0,  # 2 answers in words expected: 1 called a tool
                 "tool_call_records": 4, "tool_call_attempts": 4}


def test_the_config_names_every_metric_eval_scores() -> None:
    """config checks eval.metrics against the schema's names (it may not import eval): the two lists stay equal."""
    from peftkit.config.schema import METRIC_NAMES
    from peftkit.eval.metrics import METRICS

    assert [*METRICS, "loss"] == list(METRIC_NAMES)
