"""The image-text zoo's checkpoints are what the published ones are to the loaders: the config's token ids are the
tokenizer's image tokens, the folder loads with the Auto classes, and one small image through the family's own
processor and chat template is 4 image tokens that a training forward turns into a finite loss and gradients."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.families.vision_zoo import FAMILIES, VISION_FAMILIES, processor_needs


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_the_checkpoint_loads_with_its_image_tokens(family: str, vision_dir: Callable[[str], Path]) -> None:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    folder = vision_dir(family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    assert config.get_text_config().vocab_size == len(tokenizer)
    for key, token in FAMILIES[family].config_tokens.items():
        # a token missing from the vocabulary would read as unk (here the pad id): each is its own added token
        assert getattr(config, key) == tokenizer.convert_tokens_to_ids(token) >= 600, (key, token)
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == FAMILIES[family].chat_template
    AutoImageProcessor.from_pretrained(folder)
    AutoModelForImageTextToText.from_pretrained(folder)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_one_small_image_is_four_tokens_and_trains(family: str, vision_dir: Callable[[str], Path],
                                                   tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if missing := processor_needs(family):
        pytest.skip(f"transformers builds the {family} processor with {', '.join(missing)} only (not installed)")
    folder = vision_dir(family)
    image = tmp_path / "image.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(image)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": "what?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a cat."}]}]
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers.0." in n and "q_proj" in n)
