"""`peftkit chat`: talk to a model (base, base + adapter, or a merged folder) with its chat template."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from peftkit.config.schema import GenerateArgs, ModelArgs
from peftkit.eval.generate import generation_kwargs, render_prompt
from peftkit.model import load_model, load_tokenizer


def load_for_chat(model_name: str, adapter: str | None) -> tuple[Any, Any]:
    """Model and tokenizer; with an adapter, the tokenizer saved beside it (it has the training template)."""
    args = ModelArgs(name_or_path=model_name)
    model = load_model(args)
    if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(ModelArgs(name_or_path=adapter))
    else:
        tokenizer = load_tokenizer(args)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def _streamer(tokenizer: Any, stream: TextIO) -> Any:
    from transformers import TextStreamer

    class _ToStream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            print(text, end="\n" if stream_end else "", file=stream, flush=True)

    return _ToStream(tokenizer, skip_prompt=True, skip_special_tokens=True)


def reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], gen: GenerateArgs, stream: TextIO | None) -> str:
    """The assistant's answer to `messages`, streamed token by token to `stream` when given."""
    import torch

    ids = torch.tensor([render_prompt(tokenizer, messages)])
    streamer = _streamer(tokenizer, stream) if stream is not None else None
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                             **generation_kwargs(tokenizer, gen))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def chat_loop(model: Any, tokenizer: Any, gen: GenerateArgs, system: str | None,
              read: Any = input, out: TextIO = sys.stdout) -> None:
    """Interactive loop keeping history; `clear` forgets it, `exit` (or end of input) leaves."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    print("peftkit chat — type `clear` to forget the conversation, `exit` to leave.", file=out)
    while True:
        try:
            query = read("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if query == "exit":
            return
        if query == "clear":
            history = history[:1] if system else []
            print("(history cleared)", file=out)
            continue
        if not query:
            continue
        history.append({"role": "user", "content": query})
        print("assistant> ", end="", file=out, flush=True)
        history.append({"role": "assistant", "content": reply(model, tokenizer, history, gen, stream=out)})
