"""Messages → text through the tokenizer's chat template, for training and inference alike.

One renderer serves both: the stage encoders render each prompt and each turn with it (data/encode.py,
data/labels.py), and eval, chat, serve and export's check render the prompt to answer with `render_prompt`,
so a model is prompted exactly as it was trained. `check_template_shows` probes the template, once per
feature, for what the records carry (tools, tool calls, tool results, reasoning), so nothing is silently lost.
"""

from __future__ import annotations

from typing import Any

from peftkit.data.formats import Message, Sample
from peftkit.errors import ConfigError, PeftkitError

_VERIFIED_TEMPLATES: set[str] = set()  # templates whose fast rendering matched apply_chat_template in this process
_TEMPLATE_KEYS = ("role", "content", "tool_calls", "reasoning_content", "tool_call_id", "name")


def template_messages(messages: list[Message], reasoning: str = "train") -> list[dict[str, Any]]:
    """The messages as the chat template reads them (peftkit's `train` flag removed; reasoning removed when
    data.reasoning is drop; reasoning also as `thinking`, as transformers aliases it for templates)."""
    out = []
    for m in messages:
        plain: dict[str, Any] = {k: m[k] for k in _TEMPLATE_KEYS if k in m}  # type: ignore[literal-required]
        if reasoning == "drop":
            plain.pop("reasoning_content", None)
        elif "reasoning_content" in plain:
            plain = {"thinking": plain["reasoning_content"], **plain}
        out.append(plain)
    return out


def renderer(tokenizer: Any, first: list[Message] | None = None, tools: list[dict] | None = None) -> Any:
    """render(messages, add_generation_prompt, tools=None) as apply_chat_template renders, without its per-call
    overhead.

    The template is the one transformers compiles (same Jinja environment and globals) with the same
    variables (the special tokens, tools, documents), through a private transformers function. So that a
    transformers release that renders differently cannot pass unnoticed, the first conversation of each
    template is rendered both ways once per process, and a difference raises.
    """
    def public(messages: list[dict], gen: bool, tools: list[dict] | None = None) -> str:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tokenizer.chat_template)
        special = dict(tokenizer.special_tokens_map)
    except (ImportError, AttributeError, TypeError):  # another transformers: take the public path
        return public

    def fast(messages: list[dict], gen: bool, tools: list[dict] | None = None) -> str:
        return template.render(messages=messages, tools=tools, documents=None, add_generation_prompt=gen, **special)

    if first is not None and tokenizer.chat_template not in _VERIFIED_TEMPLATES:
        plain = template_messages(first)
        if fast(plain, False, tools) != public(plain, False, tools):
            raise PeftkitError("data.template: peftkit's fast chat-template rendering differs from "
                               "tokenizer.apply_chat_template for this template with this transformers version; "
                               "please report it (peftkit/data/render.py: renderer)")
        _VERIFIED_TEMPLATES.add(tokenizer.chat_template)
    return fast


def image_renderer(processor: Any) -> Any:
    """render(messages, add_generation_prompt, tools=None) through an image-text processor's own chat template,
    which writes each {"type": "image"} part as the model's image placeholder; text contents go in as text parts."""
    def render(messages: list[dict], gen: bool, tools: list[dict] | None = None) -> str:
        parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str)
                 else m for m in messages]  # image-text templates read a list of parts (LLaVA's, SmolVLM's only that)
        return processor.apply_chat_template(parts, tools=tools, tokenize=False, add_generation_prompt=gen)

    return render


def image_prompt(processor: Any, messages: list[Message], images: list[str],
                 tools: list[dict] | None = None) -> tuple[list[int], dict[str, Any]]:
    """An image conversation's prompt as training renders it (the processor's template, each image expanded into
    its tokens) and the model's pixel inputs for it (pixel_values and their companions, as tensors)."""
    from peftkit.data.images import load_image

    text = image_renderer(processor)(template_messages(messages), True, tools)
    out = processor(text=[text], images=[load_image(ref) for ref in images] or None,
                    add_special_tokens=adds_special_tokens(processor, text), return_tensors="pt")
    ids = out.pop("input_ids")[0].tolist()
    out.pop("attention_mask", None)
    return ids, dict(out)


def model_prompt(tokenizer: Any, processor: Any, messages: list[Message], images: list[str] | None = None,
                 tools: list[dict] | None = None, call: str | None = None) -> tuple[list[int], dict[str, Any] | None]:
    """The prompt of a conversation for a model as it trained (eval, chat and serve ask here): through an image-text
    model's `processor` (its template, each image expanded, and the pixel inputs), else `render_prompt`."""
    if processor is None or call is not None:
        if images:
            raise ConfigError(["images: this model has no image processor (it is not an image-text checkpoint)"
                               if processor is None else "images: a forced tool call cannot be combined with images"])
        return render_prompt(tokenizer, messages, tools, call), None
    ids, pixels = image_prompt(processor, messages, images or [], tools)
    return ids, pixels or None


def adds_special_tokens(processor: Any, text: str) -> bool:
    """Whether tokenizing a rendered conversation adds the tokenizer's special tokens: as a processor's own
    apply_chat_template decides, only when the template did not write the BOS itself (LLaVA's does not, Gemma's does)."""
    bos = getattr(getattr(processor, "tokenizer", processor), "bos_token", None)
    return not (bos and text.startswith(bos))


def tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one call of the Rust tokenizer (no offsets: not needed here)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer: Any, messages: list[Message], tools: list[dict] | None = None,
                  call: str | None = None) -> list[int]:
    """Token ids of the conversation so far plus the assistant's generation prompt, rendered and tokenized
    exactly as training renders a prompt (eval, chat, serve and export's check all use this).

    `call` names a tool the answer must call: the prompt then ends with the template's own opening of that
    call, up to where its arguments start (what a forced tool_choice generates is the arguments object)."""
    plain = template_messages(messages)
    render = renderer(tokenizer, messages or None, tools)
    check_template_shows(tokenizer.chat_template, render, [{"messages": messages, "tools": tools}])
    text = render(plain, True, tools)
    if call is not None:
        probe = {"type": "function", "function": {"name": call, "arguments": {"peftkit_probe_arg": 1}}}
        full = render([*plain, {"role": "assistant", "content": "", "tool_calls": [probe]}], False, tools)
        start = full.find('{"peftkit_probe_arg": 1}', len(text))
        if not full.startswith(text) or start < 0:
            raise ConfigError(["data.template: the chat template does not write a tool call's arguments as a JSON "
                               "object after its generation prompt, so a named tool_choice cannot be forced"])
        text = full[:start]
    return tokenize(tokenizer, [text])[0]


_PROBE_TOOL = {"type": "function", "function": {"name": "peftkit_probe_tool", "description": "",
                                             "parameters": {"type": "object", "properties": {}}}}
_PROBE_CALL = {"type": "function", "function": {"name": "peftkit_probe_tool", "arguments": {"peftkit_probe_arg": 1}}}
_PROBES: dict[str, tuple[list[dict], str, str]] = {  # what a record has: (a conversation showing it, what must show)
    "tools": ([{"role": "user", "content": "q"}], "peftkit_probe_tool", "the record's `tools`"),
    "tool_calls": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}],
                   "peftkit_probe_arg", "assistant `tool_calls` (sharegpt function_call turns)"),
    "tool": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
              {"role": "tool", "content": "peftkit_probe_result", "name": "peftkit_probe_tool"}],
             "peftkit_probe_result", "tool results (sharegpt observation turns)"),
    "reasoning_content": ([{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a", "reasoning_content": "peftkit_probe_thought"}],
                          "peftkit_probe_thought", "assistant reasoning (`reasoning_content` or <think>...</think>)"),
}
_SHOWN: dict[tuple[str, str], str] = {}  # (template, feature) -> "" when shown, else why not


def _features(sample: Sample) -> set[str]:
    found = {"tools"} if sample.get("tools") else set()
    for m in sample.get("messages") or []:
        found |= {k for k in ("tool_calls", "reasoning_content") if m.get(k)}
        if m["role"] == "tool":
            found.add("tool")
    return found


def check_template_shows(template: str, render: Any, samples: list[Sample], reasoning: str = "train") -> None:
    """ConfigError when samples have tools, tool calls, tool results or reasoning that the chat template would
    silently leave out of the text (checked once per template and feature, on a probe conversation)."""
    needed = set().union(*(_features(s) for s in samples)) if samples else set()
    if reasoning == "drop":
        needed.discard("reasoning_content")
    for feature in sorted(needed):
        if (template, feature) not in _SHOWN:
            messages, mark, _ = _PROBES[feature]
            try:
                text = render(messages, False, [_PROBE_TOOL])
                _SHOWN[template, feature] = "" if mark in text else "it renders without them"
            except Exception as e:  # noqa: BLE001 - a template that raises on them cannot show them
                _SHOWN[template, feature] = f"rendering raises {type(e).__name__}: {e}"
        if _SHOWN[template, feature]:
            raise ConfigError([
                f"data.template: the chat template cannot show {_PROBES[feature][2]} ({_SHOWN[template, feature]}), "
                "so the model would never see them; use data.template: chatml or llama3 (peftkit's templates with tools "
                "and reasoning) or a .jinja file that renders them"
                + (", or data.reasoning: drop" if feature == "reasoning_content" else "")
            ])
