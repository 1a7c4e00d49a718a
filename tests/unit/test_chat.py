"""Chat and generation on the tiny model: history, clear/exit, stop at the end-of-turn token."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.config.schema import GenerateArgs
from peftkit.data.render import render_prompt
from peftkit.infer import chat
from peftkit.infer.chat import chat_loop, load_for_chat
from peftkit.infer.engine import generate_batch


def test_generation_stops_at_end_of_turn_and_strips_it(tiny_model_dir: Path) -> None:
    model, tok = load_for_chat(str(tiny_model_dir), None)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make <|im_end|> the certain next token: generation must stop after one step
        model.lm_head.weight.zero_()
        model.lm_head.weight[end] = 1.0
        model.model.norm.weight.fill_(1.0)
    prompt = render_prompt(tok, [{"role": "user", "content": "hi"}])
    (ids,) = generate_batch(model, tok, [prompt], GenerateArgs(max_new_tokens=20))
    assert ids == []


def test_batched_left_padding_matches_single_generation(tiny_model_dir: Path) -> None:
    model, tok = load_for_chat(str(tiny_model_dir), None)
    prompts = [render_prompt(tok, [{"role": "user", "content": text}]) for text in ("hi", "a much longer question here")]
    args = GenerateArgs(max_new_tokens=6)
    batched = generate_batch(model, tok, prompts, args)
    assert batched == [generate_batch(model, tok, [p], args)[0] for p in prompts]


def test_chat_loop_keeps_history_and_clears(tiny_model_dir: Path, monkeypatch) -> None:
    seen: list[list[dict]] = []

    def fake_reply(model, tokenizer, messages, gen, stream, images=None):
        seen.append([dict(m) for m in messages])
        return f"answer {len(seen)}"

    monkeypatch.setattr(chat, "reply", fake_reply)
    inputs = iter(["first", "second", "clear", "third", "exit"])
    out = io.StringIO()
    chat_loop(None, None, GenerateArgs(), "be kind", read=lambda prompt: next(inputs), out=out)
    assert [m["content"] for m in seen[1]] == ["be kind", "first", "answer 1", "second"]
    assert [m["content"] for m in seen[2]] == ["be kind", "third"]
    assert "(history cleared)" in out.getvalue()


@pytest.mark.slow
def test_python_dash_m_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "peftkit", "version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("peftkit 0.1.0 (torch ")


def test_reply_streams_the_text_it_returns(tiny_model_dir: Path) -> None:
    model, tok = load_for_chat(str(tiny_model_dir), None)
    out = io.StringIO()
    text = chat.reply(model, tok, [{"role": "user", "content": "hi"}], GenerateArgs(max_new_tokens=8), stream=out)
    assert out.getvalue().strip() == text
