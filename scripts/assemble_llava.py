"""Assemble a small LLaVA-style image-text model from the embedded SmolLM2-135M-Instruct and a fresh vision tower.

No pretrained image-text model is available offline, so the learning proof of image-text fine-tuning builds
one: a LlavaForConditionalGeneration whose language model is SmolLM2-135M-Instruct, copied exactly (its
vocabulary grown by one row for the `<image>` token), whose vision tower is a tiny SigLIP encoder initialised
from scratch, and whose projector is fresh. The folder written loads with AutoProcessor.from_pretrained and
AutoModelForImageTextToText.from_pretrained.

    vision tower   SiglipVisionModel, no pooling head, no CLS token: (image_size / patch)^2 patch features,
                   all of them passed on (vision_feature_select_strategy "full", last layer)
    projector      LLaVA's two-layer MLP, vision hidden -> 576 -> 576
    processor      LlavaProcessor: CLIPImageProcessor sized to the image (resize + centre crop to
                   image_size, mean = std = 0.5), the SmolLM2 tokenizer plus the special token `<image>`
                   (expanded by the processor to one token per patch), and a chat template that is
                   SmolLM2's own for string contents and renders content lists part by part: an image part
                   as `<image>`, a text part as its text, nothing between them.

Checks run before the folder is written and again on the reloaded folder: the language part's logits equal
AutoModelForCausalLM's on a text-only prompt, string-content conversations render exactly as SmolLM2's template
renders them, and a conversation with an image gives the right number of image tokens and a finite loss.

Usage: assemble_llava.py OUT [--image-size 32] [--patch 8] [--hidden 192] [--layers 3] [--heads 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

IMAGE_TOKEN = "<image>"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2's chatml template; the content line is the only change: a string renders as before, a list part by part.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEXT_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
]


def build(out: Path, a: argparse.Namespace) -> None:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
    )

    from peftkit.model.resolve import resolve_model

    base = Path(resolve_model("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(base)
    original_template = tok.chat_template
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == len(tok) - 1, (image_id, len(tok))
    tok.chat_template = CHAT_TEMPLATE
    for conv in TEXT_CONVERSATIONS:  # string contents render exactly as SmolLM2's own template renders them
        for gen in (False, True):
            mine = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            theirs = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen,
                                             chat_template=original_template)
            assert mine == theirs, (mine, theirs)

    if a.image_size % a.patch:
        sys.exit(f"--image-size {a.image_size} is not a multiple of --patch {a.patch}")
    n_image_tokens = (a.image_size // a.patch) ** 2
    vision = SiglipVisionConfig(hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                                num_attention_heads=a.heads, image_size=a.image_size, patch_size=a.patch,
                                num_channels=3, vision_use_head=False)
    text = AutoConfig.from_pretrained(base)
    text.vocab_size = len(tok)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                         image_seq_length=n_image_tokens, vision_feature_select_strategy="full",
                         vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=True)

    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lm.eval()
    torch.manual_seed(a.seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # the vocabulary's new row: the mean of the others (it is never an input: images fill it)
        old = lm.get_input_embeddings().weight
        emb = torch.cat([old, old.mean(0, keepdim=True)])
        state = {k: v for k, v in lm.model.state_dict().items()}
        state["embed_tokens.weight"] = emb
        missing, unexpected = model.model.language_model.load_state_dict(state, strict=True)
        assert not missing and not unexpected
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr(), "untied"
    model.generation_config = lm.generation_config

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": a.image_size}, crop_size={"height": a.image_size, "width": a.image_size},
            do_center_crop=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        tokenizer=tok, patch_size=a.patch, vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=0)

    check(model, processor, lm, tok, n_image_tokens)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"saved {out}: {n_image_tokens} image tokens a picture (id {image_id}), vision tower "
          f"{sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e6:.2f}M, projector "
          f"{sum(p.numel() for p in model.model.multi_modal_projector.parameters()) / 1e6:.2f}M parameters")


def check(model, processor, lm, tok, n_image_tokens: int) -> None:
    """The language part equals SmolLM2; an image conversation runs with the right number of image tokens."""
    prompt = tok.apply_chat_template(TEXT_CONVERSATIONS[1], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.no_grad():
        want = lm(**prompt).logits
        got = model(**prompt).logits
    assert got.shape[-1] == want.shape[-1] + 1
    diff = (got[..., : want.shape[-1]] - want).abs().max().item()
    assert diff == 0.0, f"language part differs from SmolLM2: max |logit difference| {diff}"

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.png"
        Image.new("RGB", (32, 32), (200, 40, 40)).save(path)
        messages = [{"role": "user", "content": [{"type": "image", "path": str(path)},
                                                 {"type": "text", "text": "What colour is it?"}]},
                    {"role": "assistant", "content": "red"}]
        inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    ids = inputs["input_ids"]
    n = int((ids == model.config.image_token_index).sum())
    assert n == n_image_tokens, (n, n_image_tokens)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]  # "red<|im_end|>\n"
    model.train()
    out = model(**inputs, labels=labels)
    model.eval()
    assert torch.isfinite(out.loss), out.loss
    out.loss.backward()
    grad = model.model.vision_tower.embeddings.patch_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0, "no gradient reaches the vision tower"
    model.zero_grad(set_to_none=True)
    print(f"checks passed: logits equal SmolLM2's (max diff {diff}), {n} image tokens, loss {out.loss.item():.3f}")


def reload_check(out: Path, n_image_tokens: int) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    from peftkit.model.resolve import resolve_model

    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    lm = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype=torch.float32).eval()
    print(f"reloaded: {type(processor).__name__} ({type(processor.image_processor).__name__}), "
          f"{type(model).__name__}")
    check(model, processor, lm, processor.tokenizer, n_image_tokens)


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=192, help="vision tower width")
    p.add_argument("--layers", type=int, default=3, help="vision tower depth")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="initialisation of the vision tower and projector")
    a = p.parse_args()
    build(a.out, a)
    reload_check(a.out, (a.image_size // a.patch) ** 2)


if __name__ == "__main__":
    main()
