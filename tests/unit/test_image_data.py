"""Images in records: the layouts read (OpenAI parts, {type: image, path}, LLaMA-Factory's `images` + <image>), paths
relative to the dataset file, and every bad image named by file, record and field (or skipped and counted)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from peftkit.config.schema import DataArgs, DatasetSpec
from peftkit.data.dataset import iter_samples
from peftkit.data.report import Drops
from peftkit.errors import DataError


def _png(path: Path, size: tuple[int, int] = (8, 8)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


def _samples(tmp_path: Path, records: list[dict], skip: bool = False) -> tuple[list[dict], Drops]:
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    drops = Drops()
    samples = [s for s, _ in iter_samples(DatasetSpec(path=str(data)), DataArgs(format="sharegpt"),
                                          drops if skip else None)]
    return samples, drops


def _user(*parts: dict) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": "red"}]}


def test_every_layout_gives_placeholders_and_absolute_paths_in_order(tmp_path: Path) -> None:
    a, b = _png(tmp_path / "data" / "img" / "a.png"), _png(tmp_path / "data" / "img" / "b.png")
    url = "data:image/png;base64," + base64.b64encode(a.read_bytes()).decode()
    samples, _ = _samples(tmp_path, [
        _user({"type": "image_url", "image_url": {"url": "img/a.png"}}, {"type": "text", "text": "and"},
              {"type": "image", "path": str(b)}),
        _user({"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "colour?"}),
        {"conversations": [{"from": "human", "value": "first <image> then <image>"}, {"from": "gpt", "value": "x"}],
         "images": ["img/b.png", "img/a.png"]},
        {"conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}],
         "images": ["img/a.png"]},
        _user({"type": "text", "text": "only "}, {"type": "text", "text": "text"}),
    ])
    assert samples[0]["images"] == [str(a), str(b)]
    assert samples[0]["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "and"},
                                                    {"type": "image"}]
    assert samples[1]["images"] == [url]
    assert samples[2]["images"] == [str(b), str(a)]
    assert samples[2]["messages"][0]["content"] == [{"type": "text", "text": "first "}, {"type": "image"},
                                                    {"type": "text", "text": " then "}, {"type": "image"}]
    assert samples[3]["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "no placeholder"}]
    assert samples[4]["messages"][0]["content"] == "only text" and "images" not in samples[4]


@pytest.mark.parametrize(("record", "said"), [
    (_user({"type": "image", "path": "missing.png"}), "missing.png does not exist"),
    (_user({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}), "remote URL"),
    (_user({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}), "not a readable image"),
    (_user({"type": "image", "path": "broken.png"}), "not a readable image"),
    (_user({"type": "image", "path": "huge.png"}), "more than the"),
    (_user({"type": "video", "path": "a.mp4"}), "a content part must be"),
    ({"conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
      "images": ["ok.png"]}, r"1 image\(s\) listed but the messages have 2"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                      "content": [{"type": "image", "path": "ok.png"}]}]},
     "images go in user"),
])
def test_a_bad_image_is_named_and_skip_counts_it(tmp_path: Path, record: dict, said: str) -> None:
    _png(tmp_path / "data" / "ok.png")
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG not really")
    _png(tmp_path / "data" / "huge.png", (4097, 4097))
    with pytest.raises(DataError, match=said) as caught:
        _samples(tmp_path, [record])
    assert caught.value.file.endswith("train.jsonl") and caught.value.record == "line 1"
    samples, drops = _samples(tmp_path, [record, _user({"type": "image", "path": "ok.png"})], skip=True)
    assert len(samples) == 1 and drops.total == 1
