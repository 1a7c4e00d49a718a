"""`peftkit chat`: talk to a model (base, base + adapter, or a merged folder) with its chat template."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from peftkit.config.schema import GenerateArgs, ModelArgs
from peftkit.data.formats import Message
from peftkit.data.render import model_prompt, render_prompt
from peftkit.data.template import apply_template
from peftkit.infer.engine import engine_for
from peftkit.infer.jobs import Sampling
from peftkit.model import load_tokenizer
from peftkit.model.loading import load_trained


def load_for_chat(model: str | ModelArgs, adapter: str | None, stage: str = "sft",
                  template: str | None = None) -> tuple[Any, Any]:
    """Model and tokenizer of a trained run, loaded as `model` (ModelArgs: dtype, attention, remote code) says.

    With an adapter, the tokenizer saved beside it (it has the training template); otherwise the
    model's, with `template` (data.template) applied. The stage's head comes back too: rm its value
    head, cls the classifier with the run's classes.
    """
    args = model if isinstance(model, ModelArgs) else ModelArgs(name_or_path=model)
    trained = Path(adapter or args.name_or_path)
    tokenizer = load_chat_tokenizer(args, adapter, stage, template)
    loaded = load_trained(args, trained, stage, adapter is not None, tokenizer.pad_token_id)
    loaded.eval()
    return loaded, tokenizer


def load_chat_tokenizer(args: ModelArgs, adapter: str | None, stage: str = "sft", template: str | None = None) -> Any:
    """The tokenizer load_for_chat uses: the one saved beside an adapter (it has the training template), else the
    model's with `template` (data.template) applied."""
    if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
        return load_tokenizer(replace(args, name_or_path=adapter))
    tokenizer = load_tokenizer(args)
    if template is not None:
        apply_template(tokenizer, template, stage)
    return tokenizer


def _streamer(tokenizer: Any, stream: TextIO) -> Any:
    from transformers import TextStreamer

    class _ToStream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            print(text, end="\n" if stream_end else "", file=stream, flush=True)

    return _ToStream(tokenizer, skip_prompt=False, skip_special_tokens=True)  # fed only the new tokens


@dataclass(frozen=True)
class ChatImages:
    """`peftkit chat --image`: the image-text model's processor and the images shown with the first prompt."""

    processor: Any
    paths: list[str]


def chat_images(model: str | ModelArgs, paths: list[str]) -> ChatImages | None:
    """The processor and checked paths for `--image` (None without images); a user error names what is wrong."""
    from peftkit.data.images import load_image, resolve
    from peftkit.errors import PeftkitError
    from peftkit.model.loading import load_processor

    if not paths:
        return None
    args = model if isinstance(model, ModelArgs) else ModelArgs(name_or_path=model)
    processor = load_processor(args)
    if processor is None:
        raise PeftkitError(f"--image: {args.name_or_path} is not an image-text model (it has no image processor)")
    checked = []
    for path in paths:
        try:
            checked.append(resolve(path, Path.cwd()))
            load_image(checked[-1])
        except ValueError as e:
            raise PeftkitError(f"--image {path}: {e}") from None
    return ChatImages(processor, checked)


def _with_images(messages: list[Message], images: ChatImages) -> list[Message]:
    """The conversation with the images in front of the first user message's text."""
    out, shown = [], False
    for m in messages:
        if m["role"] == "user" and not shown and isinstance(m["content"], str):
            m = {**m, "content": [*({"type": "image"} for _ in images.paths), {"type": "text", "text": m["content"]}]}
            shown = True
        out.append(m)
    return out


def reply(model: Any, tokenizer: Any, messages: list[Message], gen: GenerateArgs, stream: TextIO | None,
          images: ChatImages | None = None) -> str:
    """The assistant's answer to `messages` (with `images` before the first prompt), streamed token by token to
    `stream` when given."""
    import torch

    streamer = _streamer(tokenizer, stream) if stream is not None else None
    if images is not None:
        prompt, pixels = model_prompt(tokenizer, images.processor, _with_images(messages, images), images.paths)
    else:
        prompt, pixels = render_prompt(tokenizer, messages), None
    engine = engine_for(model, tokenizer, [prompt], gen.max_new_tokens, slots=1)
    try:
        job = engine.submit(prompt, Sampling.of(gen), pixels)
    except ValueError as e:
        from peftkit.errors import PeftkitError

        raise PeftkitError(str(e)) from None
    for new in engine.follow(job):
        if streamer is not None:
            streamer.put(torch.tensor(new))
    if streamer is not None:
        streamer.end()
    return tokenizer.decode(job.tokens, skip_special_tokens=True).strip()


def chat_loop(model: Any, tokenizer: Any, gen: GenerateArgs, system: str | None,
              read: Any = input, out: TextIO = sys.stdout, images: ChatImages | None = None) -> None:
    """Interactive loop keeping history; `clear` forgets it, `exit` (or end of input) leaves."""
    history: list[Message] = [{"role": "system", "content": system}] if system else []
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
        history.append({"role": "assistant", "content": reply(model, tokenizer, history, gen, stream=out,
                                                              images=images)})
