"""The resume NER converter: BMES tags to JSON answers; the bundled files are what it produces."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("prepare_resume_ner", REPO / "scripts/prepare_resume_ner.py")
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)


def test_bmes_to_entities() -> None:
    sentence = [("高", "B-NAME"), ("勇", "E-NAME"), ("：", "O"), ("中", "B-CONT"), ("国", "E-CONT"),
                ("汉", "S-RACE"), ("工", "B-TITLE"), ("程", "M-TITLE"), ("师", "E-TITLE"), ("经", "B-TITLE"), ("理", "E-TITLE")]
    assert prep.extract_entities(sentence) == {"姓名": ["高勇"], "国籍": ["中国"], "种族": ["汉"], "职位": ["工程师", "经理"]}


def test_broken_span_is_dropped_not_guessed() -> None:
    assert prep.extract_entities([("a", "B-ORG"), ("b", "M-LOC"), ("c", "E-LOC")]) == {}


def test_malformed_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "x.bmes"
    path.write_text("高 B-NAME\n-NAME\n勇 E-NAME\n\n中 S-LOC\n", encoding="utf-8")
    assert prep.read_bmes(path) == [[("高", "B-NAME"), ("勇", "E-NAME")], [("中", "S-LOC")]]


def test_bundled_records_are_reproducible(tmp_path: Path) -> None:
    assert prep.main(["--src-dir", str(REPO / "data/resume_ner"), "--out-dir", str(tmp_path)]) == 0
    bundled = {split: json.loads((REPO / f"data/resume_ner/{split}.json").read_text(encoding="utf-8"))
               for split in ("train", "dev")}
    for split, records in bundled.items():
        assert json.loads((tmp_path / f"{split}.json").read_text(encoding="utf-8")) == records
    assert bundled["train"][0] == {"instruction": "高勇：男，中国国籍，无境外居留权，",
                                   "output": '{"姓名": ["高勇"], "国籍": ["中国国籍"]}'}


def test_every_split_present_is_converted_in_the_chosen_style(tmp_path: Path) -> None:
    (tmp_path / "test.char.bmes").write_text("高 B-NAME\n勇 E-NAME\n\n", encoding="utf-8")
    assert prep.main(["--src-dir", str(tmp_path), "--out-dir", str(tmp_path), "--prompt", "compact"]) == 0
    made = json.loads((tmp_path / "test_compact.json").read_text(encoding="utf-8"))
    assert made == [{"instruction": prep.COMPACT_INSTRUCTION, "input": "高勇", "output": '{"姓名": ["高勇"]}'}]
    assert prep.main(["--src-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path)]) == 2


def test_tutorial_prompt_has_example_and_restated_task() -> None:
    record = prep.to_record([("高", "B-NAME"), ("勇", "E-NAME")], "tutorial")
    assert "示例" in record["instruction"] and record["instruction"].endswith("以JSON格式输出。")
    assert record["output"] == '{"姓名": ["高勇"]}'
