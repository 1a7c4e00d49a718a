"""Tiny random image-text checkpoints of the families users bring, built from transformers' own config classes.

Each folder holds what a published checkpoint holds, so `AutoProcessor` and `AutoModelForImageTextToText` load it as
they load the real one: the test tokenizer plus the family's own image tokens, the family's image processor sized so
one small image gives 4 image tokens, the published chat template, and a model of text hidden 64, 2 layers (4 where a
family alternates layer kinds), vision hidden 32, 1 layer (llava: 2), its weights moved off their initialisation.

The Qwen and SmolVLM processors hold a video processor, which transformers builds with torchvision only: without it
their processor files are written by hand (the same files), `AutoImageProcessor` / `AutoTokenizer` load them, and
`AutoProcessor` loads them where torchvision is installed (`processor_needs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.families.zoo import COMMON, WINDOW

VISION_FAMILIES: tuple[str, ...] = ("llava", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "smolvlm")

# --- the published chat templates, verbatim ---------------------------------------------------------------------

# llava-hf/llava-1.5-7b-hf chat_template.json. It reads content as parts only: a string content renders as nothing.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen/Qwen2.5-VL-*-Instruct chat_template.json (the Qwen2-VL one)
QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen3-VL-*-Instruct chat_template.json
QWEN3_VL_TEMPLATE = (
    """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"""
    """You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments """
    """within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"""
    """{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
)

# google/gemma-3-*-it chat template
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# HuggingFaceTB/SmolVLM-Instruct chat_template.json (an idefics3 checkpoint; HuggingFaceM4/Idefics3-8B-Llama3's
# differs only in its first literal, its own bos <|begin_of_text|>). It reads content as parts only: a string content
# renders as nothing but the role.
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# SmolVLM2's as transformers quoted it when SmolVLM2 came out (SmolVLMProcessor DEFAULT_CHAT_TEMPLATE, since given a
# string-content branch there): SmolVLM-Instruct's with a video part. Not checked against a hub file.
SMOLVLM_TEMPLATE = IDEFICS3_TEMPLATE.replace("{{ '<image>' }}{% endif %}",
                                             "{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}")

# --- the families -----------------------------------------------------------------------------------------------

QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
# Idefics3 / SmolVLM: the image's frame, its global tag, the tile tags of a split image (6 x 6, as published)
IDEFICS3_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
# SigLIP-like tower: 32 px images in 8 px patches (16), pixel-shuffled by 2 into 4 image tokens
IDEFICS3_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "image_size": 32, "patch_size": 8}
IDEFICS3_IMAGES = {"do_image_splitting": False, "size": {"longest_edge": 32}, "max_image_size": {"longest_edge": 32}}


@dataclass(frozen=True)
class VisionFamily:
    """What one family's checkpoint is made of; token strings stand where the config and processor want ids."""

    model_type: str
    processor_class: str
    image_processor: tuple[str, dict[str, Any]]  # class name in transformers, its arguments
    chat_template: str
    text_config: dict[str, Any]
    vision_config: dict[str, Any]
    config_tokens: dict[str, str]  # config key → token whose id it holds
    extra_tokens: tuple[str, ...] = ()  # special tokens added to the test tokenizer
    named_tokens: dict[str, str] = field(default_factory=dict)  # tokenizer attributes (boi_token, ...) → token
    eos_token: str | None = None  # where the family's tokenizer ends a turn with its own eos
    add_bos: bool = False  # the family's tokenizer puts bos before every text it encodes (Llama's, Gemma's)
    config: dict[str, Any] = field(default_factory=dict)
    processor: dict[str, Any] = field(default_factory=dict)
    video_processor: tuple[str, dict[str, Any]] | None = None
    generation_eos: tuple[str, ...] = ()  # tokens generation stops on beside eos (generation_config.json)


FAMILIES: dict[str, VisionFamily] = {
    # CLIP tower: 32 px in 16 px patches, CLS dropped ("default") → 4 image tokens. Two vision layers: the projector
    # reads the second last (vision_feature_layer -2), so the last one gets no gradient, as on llava-1.5.
    "llava": VisionFamily(
        "llava", "LlavaProcessor",
        ("CLIPImageProcessor", {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}),
        LLAVA_TEMPLATE, {"model_type": "llama"},
        {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "image_size": 32, "patch_size": 16, "projection_dim": 32},
        {"image_token_index": "<image>"}, extra_tokens=("<image>",), add_bos=True,
        config={"vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 4},
        processor={"patch_size": 16, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
                   "image_token": "<image>"}),
    # 14 px patches merged 2 x 2: between 56 x 56 and 112 x 112 pixels, 4 to 16 image tokens (a 32 x 32 image: 4).
    # mrope sections sum to head_dim / 2 = 8, in the published proportions (16, 24, 24).
    "qwen2_5_vl": VisionFamily(
        "qwen2_5_vl", "Qwen2_5_VLProcessor",
        ("Qwen2VLImageProcessor", {"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}}),
        QWEN2_5_VL_TEMPLATE,
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}},
        {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
         "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
         "fullatt_block_indexes": []},  # its one block windowed, as 28 of the published 32 are
        QWEN_IDS, extra_tokens=QWEN_TOKENS,
        video_processor=("Qwen2VLVideoProcessor", {"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}})),
    # 16 px patches merged 2 x 2: between 64 x 64 and 128 x 128 pixels, 4 to 16 image tokens (a 32 x 32 image: 4);
    # interleaved mrope sections sum to 8 (published: 24, 20, 20 of 64); the deepstack tap on its one block.
    "qwen3_vl": VisionFamily(
        "qwen3_vl", "Qwen3VLProcessor",
        ("Qwen2VLImageProcessor", {"size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, "patch_size": 16,
                                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
        QWEN3_VL_TEMPLATE,
        {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                             "mrope_section": [4, 2, 2], "mrope_interleaved": True}},
        {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
         "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "deepstack_visual_indexes": [0]},
        QWEN_IDS, extra_tokens=QWEN_TOKENS,
        video_processor=("Qwen3VLVideoProcessor", {"size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128},
                                                   "patch_size": 16})),
    # SigLIP tower: 32 px in 8 px patches (16) pooled to 4 soft tokens, framed by boi / eoi
    "gemma3": VisionFamily(
        "gemma3", "Gemma3Processor",
        ("Gemma3ImageProcessor", {"size": {"height": 32, "width": 32}, "do_pan_and_scan": False,
                                  "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
        GEMMA3_TEMPLATE,
        {"head_dim": 16, "sliding_window": WINDOW, "num_hidden_layers": 4, "sliding_window_pattern": 2},
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "image_size": 32, "patch_size": 8},
        {"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>",
         "image_token_index": "<image_soft_token>"},
        extra_tokens=("<start_of_turn>", "<end_of_turn>"), add_bos=True,
        named_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                      "image_token": "<image_soft_token>"},
        config={"mm_tokens_per_image": 4}, processor={"image_seq_length": 4}, generation_eos=("<end_of_turn>",)),
    # SmolVLM-Instruct (an idefics3 checkpoint): bos <|im_start|>, each turn closed by its eos <end_of_utterance>
    "idefics3": VisionFamily(
        "idefics3", "Idefics3Processor", ("Idefics3ImageProcessor", IDEFICS3_IMAGES), IDEFICS3_TEMPLATE,
        {"model_type": "llama"}, {"model_type": "idefics3_vision", **IDEFICS3_VISION},
        {"image_token_id": "<image>"}, extra_tokens=IDEFICS3_TOKENS, eos_token="<end_of_utterance>",
        config={"scale_factor": 2}, processor={"image_seq_len": 4}),
    # SmolVLM2: Idefics3 with its own connector and processor (which also needs the num2words package)
    "smolvlm": VisionFamily(
        "smolvlm", "SmolVLMProcessor", ("SmolVLMImageProcessor", IDEFICS3_IMAGES), SMOLVLM_TEMPLATE,
        {"model_type": "llama"}, {"model_type": "smolvlm_vision", **IDEFICS3_VISION},
        {"image_token_id": "<image>"}, extra_tokens=IDEFICS3_TOKENS, eos_token="<end_of_utterance>",
        config={"scale_factor": 2}, processor={"image_seq_len": 4},
        video_processor=("SmolVLMVideoProcessor", IDEFICS3_IMAGES)),
}


def processor_needs(family: str) -> list[str]:
    """The packages missing here that `AutoProcessor` needs for this family: torchvision for a video processor,
    num2words for SmolVLM's (an empty list: it loads)."""
    from importlib.util import find_spec

    spec = FAMILIES[family]
    wanted = (["torchvision"] if spec.video_processor else []) + (["num2words"] if family == "smolvlm" else [])
    return [name for name in wanted if find_spec(name) is None]


def vision_tokenizer(family: str, tokenizer_dir: Path) -> Any:
    """The test tokenizer with the family's special tokens added after its vocabulary, named as the family names
    them (tokenizer.boi_token, ...)."""
    from transformers import AutoTokenizer

    spec = FAMILIES[family]
    kwargs: dict[str, Any] = {"eos_token": spec.eos_token} if spec.eos_token else {}
    if spec.add_bos:
        kwargs["add_bos_token"] = True
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens=dict(spec.named_tokens), **kwargs)
    if spec.extra_tokens:
        tokenizer.add_special_tokens({"extra_special_tokens": list(spec.extra_tokens)},
                                     replace_extra_special_tokens=False)
    return tokenizer


def vision_config(family: str, tokenizer: Any) -> Any:
    """The family's config at test size, its vocabulary and token ids the tokenizer's."""
    from transformers import AutoConfig

    spec = FAMILIES[family]
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = {**COMMON, **spec.text_config, **ids}
    vision = dict(spec.vision_config)
    tokens = {key: tokenizer.convert_tokens_to_ids(token) for key, token in spec.config_tokens.items()}
    return AutoConfig.for_model(spec.model_type, text_config=text, vision_config=vision, **spec.config, **tokens,
                                **{k: v for k, v in ids.items() if k != "vocab_size"})


def save_processor(family: str, tokenizer: Any, out: Path) -> None:
    """The processor's files in `out`: saved by the processor itself, or, where transformers cannot build it here
    (no torchvision for a video processor, no num2words for SmolVLM's), the same files written from its parts."""
    import transformers

    spec = FAMILIES[family]
    name, kwargs = spec.image_processor
    image_processor = getattr(transformers, name)(**kwargs)
    try:
        video = [getattr(transformers, spec.video_processor[0])(**spec.video_processor[1])] if spec.video_processor else []
        processor = getattr(transformers, spec.processor_class)(image_processor, tokenizer, *video,
                                                               chat_template=spec.chat_template, **spec.processor)
    except ImportError:
        tokenizer._set_processor_class(spec.processor_class)  # as processor.save_pretrained does
        tokenizer.save_pretrained(out)
        (out / "chat_template.jinja").write_text(spec.chat_template, encoding="utf-8")
        config: dict[str, Any] = {"image_processor": json.loads(image_processor.to_json_string()),
                                  "processor_class": spec.processor_class, **spec.processor}
        if spec.video_processor:
            video_name, video_kwargs = spec.video_processor
            config["video_processor"] = {**video_kwargs, "video_processor_type": video_name}
        (out / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                                   encoding="utf-8")
        return
    processor.save_pretrained(out)


def build_vision(family: str, out: Path, tokenizer_dir: Path) -> Path:
    """A saved checkpoint of `family` in `out` (weights jittered after seed 0, as the text families' are, so a leak
    between records or images moves the loss as well as the gradients); returns `out`."""
    import torch
    from transformers import AutoModelForImageTextToText

    spec = FAMILIES[family]
    tokenizer = vision_tokenizer(family, tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(vision_config(family, tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if spec.generation_eos:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id,
                                                *tokenizer.convert_tokens_to_ids(list(spec.generation_eos))]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(family, tokenizer, out)
    return out
