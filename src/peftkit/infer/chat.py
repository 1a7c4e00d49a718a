"""`peftkit chat`: talk to a model (base, base + adapter, or a merged folder) with its chat template."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from peftkit.config.schema import GenerateArgs, ModelArgs
from peftkit.constants import DATA_REPORT_FILE
from peftkit.errors import ModelError
from peftkit.eval.generate import generation_kwargs, render_prompt
from peftkit.model import load_model, load_tokenizer
from peftkit.model.value_head import load_value_head


def load_for_chat(model_name: str, adapter: str | None, stage: str = "sft") -> tuple[Any, Any]:
    """Model and tokenizer of a trained run; with an adapter, the tokenizer saved beside it (it has the
    training template). rm restores the value head, cls the classifier with the run's classes."""
    args = ModelArgs(name_or_path=model_name)
    trained = Path(adapter or model_name)
    if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(ModelArgs(name_or_path=adapter))
    else:
        tokenizer = load_tokenizer(args)
    model = load_model(args, _saved_classes(trained) if stage == "cls" else None, tokenizer.pad_token_id)
    if stage == "rm":  # before the adapter, whose config excludes the head from LoRA's targets
        load_value_head(model, trained)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def _saved_classes(trained: Path) -> list[str]:
    """The class names of a cls run: its data_report.json (beside a checkpoint, or one folder up), else config.json."""
    import json

    for folder in (trained, trained.parent):
        report = folder / DATA_REPORT_FILE
        if report.is_file():
            classes = json.loads(report.read_text(encoding="utf-8")).get("classes")
            if classes:
                return classes
    config = trained / "config.json"
    if config.is_file():
        id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
        if id2label:
            return [id2label[str(i)] for i in range(len(id2label))]
    raise ModelError(f"{trained}: no data_report.json or config.json with the classes — is it the output_dir of a "
                     "`stage: cls` run?")


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
