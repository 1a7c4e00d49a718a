"""Image-text fine-tuning on each image-text family of the zoo (tests/families/vision_zoo.py): ids and labels equal to
the processor's own, a padded batch equal to its records one by one, LoRA / freeze / full steps that train what the
keys say, image prompts answered as transformers answers them (or refused with the reason), packing refused.

Qwen2.5-VL / Qwen3-VL / SmolVLM: transformers builds their processors with torchvision only, which this machine's
CPU torch cannot take (the machine's notes: PyPI's torchvision fails to import beside it); peftkit refuses them with
that reason, and the test says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.families.vision_zoo import VISION_FAMILIES, processor_needs

NEED_TORCHVISION = ("qwen2_5_vl", "qwen3_vl", "smolvlm")  # their processors hold a video processor
# what this machine can build a processor for: all six where torchvision is installed
LOADABLE = tuple(f for f in VISION_FAMILIES if not processor_needs(f))
THREE_D = ("qwen2_5_vl", "qwen3_vl")  # 3-D rope positions: image prompts refused by the engine
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="session")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.jsonl beside images/: OpenAI image parts, a two-image record, LLaMA-Factory's `images` + <image>, and
    a text-only record (paths relative to the file)."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("image_data")
    (folder / "images").mkdir()
    for n, (name, colour) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (32, 32), (255, 255, 255))
        ImageDraw.Draw(image).ellipse((4 + n, 4, 26, 26), fill=colour)
        image.save(folder / "images" / f"{name}.png")
    records = [
        {"messages": [{"role": "user", "content": [{"type": "image", "path": f"images/{name}.png"},
                                                   {"type": "text", "text": "What colour is it?"}]},
                      {"role": "assistant", "content": name}]} for name in COLOURS
    ] + [
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "images/red.png"}}, {"type": "text", "text": "and"},
            {"type": "image", "path": "images/blue.png"}, {"type": "text", "text": "Which is first?"}]},
            {"role": "assistant", "content": "red"}]},
        {"conversations": [{"from": "human", "value": "<image>Name the colour."}, {"from": "gpt", "value": "green"}],
         "images": ["images/green.png"]},
        {"messages": [{"role": "user", "content": "No picture today."}, {"role": "assistant", "content": "Fine."}]},
    ]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _encoded(model: Path, data: Path, **data_keys: object) -> tuple[object, object, object]:
    from peftkit.config.schema import DataArgs, ModelArgs
    from peftkit.data import build_dataset
    from peftkit.model import load_tokenizer
    from peftkit.model.loading import load_processor

    args = ModelArgs(name_or_path=str(model))
    tokenizer, processor = load_tokenizer(args), load_processor(args)
    keys = {"format": "sharegpt", "cutoff_len": 256, **data_keys}
    ds, report = build_dataset([str(data)], DataArgs(**keys), tokenizer, processor=processor)  # type: ignore[arg-type]
    return ds, processor, report


def _as_parts(message: dict) -> dict:
    content = message["content"]
    return {**message, "content": [{"type": "text", "text": content}] if isinstance(content, str) else content}


@pytest.mark.parametrize("family", LOADABLE)
def test_ids_equal_the_processors_and_only_the_answer_is_supervised(family: str, vision_dir: Callable[[str], Path],
                                                                    image_data: Path) -> None:
    from peftkit.constants import IGNORE_INDEX
    from peftkit.data.images import image_token_ids

    ds, processor, report = _encoded(vision_dir(family), image_data)
    records = [json.loads(line) for line in image_data.read_text(encoding="utf-8").splitlines()]
    assert len(ds) == len(records) and report.datasets[0].drops.total == 0
    marks = image_token_ids(processor)
    for n in range(4):  # the OpenAI-part records, with the processor loading the images from their paths
        messages = [_as_parts(m) for m in records[n]["messages"]]
        for m in messages:
            for part in m["content"]:
                if part["type"] in ("image", "image_url"):
                    path = part.pop("path", None) or part.pop("image_url")["url"]
                    part.update(type="image", path=str(image_data.parent / path))
        full = processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        prompt = processor.apply_chat_template(messages[:-1], tokenize=True, return_dict=True,
                                               add_generation_prompt=True)["input_ids"]
        full, prompt = (list(x[0]) if isinstance(x[0], list) else list(x) for x in (full, prompt))
        assert ds[n]["input_ids"] == full, family
        labels = ds[n]["labels"]
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt):] == [t if t not in marks else IGNORE_INDEX for t in full[len(prompt):]]
        assert any(t in marks for t in full[: len(prompt)])  # the image is in the (unsupervised) prompt
        assert not any(t in marks for t, lab in zip(full, labels) if lab != IGNORE_INDEX)
    assert ds[3]["images"] == [str(image_data.parent / "images" / f) for f in ("red.png", "blue.png")]
    assert ds[5]["images"] == []


@pytest.mark.parametrize("family", LOADABLE)
def test_a_padded_batch_of_image_records_equals_them_one_by_one(family: str, vision_dir: Callable[[str], Path],
                                                                 image_data: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from peftkit.config.schema import ModelArgs
    from peftkit.data import build_collator
    from peftkit.model import load_tokenizer

    ds, processor, _ = _encoded(vision_dir(family), image_data)
    tokenizer = load_tokenizer(ModelArgs(name_or_path=str(vision_dir(family))))
    collate = build_collator(tokenizer, False, stage="sft", processor=processor)
    model = AutoModelForImageTextToText.from_pretrained(vision_dir(family), dtype=torch.float32)
    rows = [ds[0], ds[3], ds[5]]  # one image, two images, none

    def summed(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum")
        loss.backward()
        weight = model.get_decoder().layers[0].self_attn.q_proj.weight
        return loss.detach(), weight.grad.clone()

    together = summed(collate(rows))
    alone = [summed(collate([r])) for r in rows]
    assert torch.allclose(together[0], sum(a[0] for a in alone), atol=1e-4)
    assert torch.allclose(together[1], sum(a[1] for a in alone), atol=1e-5)


@pytest.mark.parametrize("family", LOADABLE)
def test_lora_trains_the_language_model_and_the_keys_say_what_else(family: str, vision_dir: Callable[[str], Path],
                                                                   image_data: Path, tmp_path: Path) -> None:
    """LoRA wraps the language model only; an unfrozen projector trains in full beside it (modules_to_save)."""
    from safetensors import safe_open

    from peftkit.config import load_config
    from peftkit.train.run import train
    from tests.helpers import tiny_run

    out = tmp_path / "run"
    train(load_config(None, tiny_run(vision_dir(family), out, "data.format=sharegpt", "finetuning.lora_rank=4",
                                     "finetuning.freeze_multi_modal_projector=false", data=image_data,
                                     batch_size=3, cutoff_len=256)))
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    lora = [n for n in names if "lora_" in n]
    assert lora and all(not any(v in n for v in ("vision_tower", "visual", "vision_model")) for n in lora)
    assert any(p in n for n in names for p in ("multi_modal_projector", "connector", "merger"))  # projector, in full
    assert (out / "processor_config.json").is_file() or (out / "preprocessor_config.json").is_file()
    logged = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if r.get("loss") is not None]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_generation_merges_lora_beside_a_vision_tower_trained_in_full(vision_dir: Callable[[str], Path]) -> None:
    """Eval after LoRA with the tower unfrozen (the learning proof's recipe): the tower's modules_to_save wrapper
    is no tuner layer, so the LoRA layers alone are merged while generating and unmerged after (this crashed eval
    at the end of training before)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForImageTextToText

    from peftkit.infer.merging import adapters_merged

    base = AutoModelForImageTextToText.from_pretrained(vision_dir("llava"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                            modules_to_save=["vision_tower"], init_lora_weights=False))
    tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with adapters_merged(model):  # random B matrices: merging moves the base weights, unmerging puts them back
        assert tuners and all(m.merged for m in tuners)
        assert any(not torch.allclose(p, before[n], atol=1e-6) for n, p in model.named_parameters() if n in before)
    assert not any(m.merged for m in tuners)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.allclose(p, before[n], atol=1e-6), n


@pytest.mark.parametrize("finetuning", ["freeze", "full"])
def test_freeze_and_full_tuning_freeze_the_vision_tower_by_default(finetuning: str, vision_dir: Callable[[str], Path],
                                                                   image_data: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from peftkit.config.schema import FinetuningArgs
    from peftkit.model.families import vision_parts
    from peftkit.model.finetuning import prepare_for_training

    model = AutoModelForImageTextToText.from_pretrained(vision_dir("llava"))
    towers, projectors = vision_parts(model)
    assert towers == ["model.vision_tower"] and projectors == ["model.multi_modal_projector"]
    for tower_frozen in (True, False):
        prepare_for_training(model, FinetuningArgs(finetuning_type=finetuning, freeze_vision_tower=tower_frozen))
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any(n.startswith("model.language_model.layers.1.") for n in trained)
        assert any(n.startswith("model.vision_tower.") for n in trained) is (not tower_frozen)
        assert not any(n.startswith("model.multi_modal_projector.") for n in trained)


@pytest.mark.parametrize("family", [f for f in LOADABLE if f not in THREE_D])
def test_the_engine_answers_image_prompts_as_transformers_does(family: str, vision_dir: Callable[[str], Path],
                                                               image_data: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from peftkit.config.schema import ModelArgs
    from peftkit.data.render import image_prompt
    from peftkit.infer.engine import Engine
    from peftkit.infer.jobs import Sampling
    from peftkit.model import load_tokenizer
    from peftkit.model.loading import load_processor

    args = ModelArgs(name_or_path=str(vision_dir(family)))
    processor, tokenizer = load_processor(args), load_tokenizer(args, padding_side="left")
    model = AutoModelForImageTextToText.from_pretrained(vision_dir(family), dtype=torch.float32).eval()
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompts = [image_prompt(processor, question, [str(image_data.parent / "images" / f"{c}.png")]) for c in COLOURS]
    prompts.append(image_prompt(processor, [{"role": "user", "content": "Hello there"}], []))
    engine = Engine(model, tokenizer, slots=4, max_len=160)
    jobs = engine.generate([p for p, _ in prompts], Sampling(max_new_tokens=8, temperature=0.0),
                           pixels=[px or None for _, px in prompts])
    for (ids, pixels), job in zip(prompts, jobs):
        reference = model.generate(input_ids=torch.tensor([ids]), **pixels, max_new_tokens=8, do_sample=False,
                                   eos_token_id=sorted(engine.stops))[0, len(ids):].tolist()
        assert job.tokens == [t for t in reference if t not in engine.stops][: len(job.tokens)]
        assert len(job.tokens) == 8 or reference[len(job.tokens)] in engine.stops


def test_the_engine_refuses_image_prompts_it_would_answer_differently(vision_dir: Callable[[str], Path]) -> None:
    """Qwen2.5-VL places an image in 3-D rope positions, which the engine's 1-D positions cannot carry."""
    from transformers import AutoModelForImageTextToText

    from peftkit.config.schema import ModelArgs
    from peftkit.infer.engine import Engine
    from peftkit.infer.jobs import Sampling
    from peftkit.model import load_tokenizer

    folder = vision_dir("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    engine = Engine(model, load_tokenizer(ModelArgs(name_or_path=str(folder))), slots=1, max_len=96)
    with pytest.raises(ValueError, match="3-D rope positions.*--engine vllm"):
        engine.submit([1, 2, 3], Sampling(max_new_tokens=4, temperature=0.0), {"pixel_values": torch.zeros(4, 8)})
    assert engine.submit([1, 2, 3], Sampling(max_new_tokens=4, temperature=0.0))  # text prompts are answered


@pytest.mark.parametrize("family", NEED_TORCHVISION)
def test_a_processor_that_needs_torchvision_is_refused_with_the_reason(family: str,
                                                                       vision_dir: Callable[[str], Path]) -> None:
    from peftkit.config.schema import ModelArgs
    from peftkit.errors import ModelError
    from peftkit.model.loading import load_processor

    if not processor_needs(family):
        pytest.skip(f"torchvision is installed: {family}'s processor loads (the tier's other tests cover it)")
    with pytest.raises(ModelError, match="torchvision"):
        load_processor(ModelArgs(name_or_path=str(vision_dir(family))))


def test_packing_is_refused_for_image_records(vision_dir: Callable[[str], Path], image_data: Path) -> None:
    from peftkit.config.schema import DataArgs, ModelArgs
    from peftkit.data import prepare_data
    from peftkit.errors import ConfigError
    from peftkit.model import load_tokenizer
    from peftkit.model.loading import load_processor

    args = ModelArgs(name_or_path=str(vision_dir("llava")))
    data = DataArgs(train=str(image_data), format="sharegpt", cutoff_len=256, overwrite_cache=True)
    report = prepare_data(data, load_tokenizer(args), "sft", load_processor(args)).report
    assert report.images == {"examples": 5, "images": 6, "tokens": {"min": 4, "p50": 4, "p90": 8, "p99": 8,
                                                                     "max": 8}}
    assert "<image>x4" in report.example  # an image's tokens shown once, with their count
    with pytest.raises(ConfigError, match="records with images are not packed"):
        prepare_data(replace(data, packing=True), load_tokenizer(args), "sft", load_processor(args))


def test_truncation_never_cuts_an_image(vision_dir: Callable[[str], Path], image_data: Path) -> None:
    """cutoff_len shorter than the prompt: a text record is shortened, an image record dropped and counted."""
    ds, _, report = _encoded(vision_dir("llava"), image_data, cutoff_len=14)
    drops = report.datasets[0].drops.reasons
    assert drops["cutoff_len would cut through an image's tokens"]["count"] >= 1
    assert all(not row for row in ds["images"])


def test_serve_answers_an_image_prompt_to_the_openai_client(vision_dir: Callable[[str], Path], image_data: Path,
                                                           tmp_path: Path) -> None:
    """A real `peftkit serve` process: a data: URL image answered as the engine answers it offline; a file under
    --image-root is read, one outside it, a remote URL and a broken image are refused with 400s that say why."""
    import base64

    import openai

    from peftkit.config.schema import ModelArgs
    from peftkit.data.render import model_prompt
    from peftkit.infer.engine import Engine
    from peftkit.infer.jobs import Sampling
    from peftkit.model import load_tokenizer
    from peftkit.model.loading import load_model, load_processor
    from tests.unit.test_serve import KEY, start_server

    folder, red = vision_dir("llava"), image_data.parent / "images" / "red.png"
    url = "data:image/png;base64," + base64.b64encode(red.read_bytes()).decode()
    args = ModelArgs(name_or_path=str(folder))
    ids, pixels = model_prompt(load_tokenizer(args), load_processor(args),
                               [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                               [str(red)])
    engine = Engine(load_model(args).eval(), load_tokenizer(args), slots=1, max_len=128)
    offline = engine.generate([ids], Sampling(max_new_tokens=6, temperature=0.0), pixels=[pixels])[0].tokens
    expected = load_tokenizer(args).decode(offline, skip_special_tokens=True)
    servers = start_server("--model", str(folder), "--image-root", str(image_data.parent))
    base = next(servers)
    try:
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)

        def ask(image: str) -> str:
            content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Colour?"}]
            answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                    max_tokens=6, temperature=0)
            return answer.choices[0].message.content or ""

        answer = ask(url)
        assert answer == expected.strip()  # (the server's message content is the decoded answer, stripped)
        assert ask(str(red)) == answer  # the same image as a file under --image-root
        outside = tmp_path / "red.png"
        outside.write_bytes(red.read_bytes())
        broken = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
        for bad, said in ((str(outside), "--image-root"), ("https://example.com/a.png", "remote image URLs"),
                          (broken, "not a readable image")):
            with pytest.raises(openai.BadRequestError, match=said):
                ask(bad)
    finally:
        next(servers, None)


def test_chat_shows_an_image_with_the_prompt(vision_dir: Callable[[str], Path], image_data: Path) -> None:
    import subprocess
    import sys

    red = image_data.parent / "images" / "red.png"
    run = [sys.executable, "-m", "peftkit", "chat", "--model", str(vision_dir("llava")), "--prompt", "Colour?",
           "--max-new-tokens", "4"]
    shown = subprocess.run([*run, "--image", str(red)], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    missing = subprocess.run([*run, "--image", str(red.with_name("nope.png"))], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "nope.png does not exist" in missing.stderr


def test_the_merged_export_loads_in_plain_transformers_and_reads_images_as_the_run(
        vision_dir: Callable[[str], Path], image_data: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from peftkit.config import load_config
    from peftkit.export import export
    from peftkit.train.run import train
    from tests.helpers import tiny_run

    run, out = tmp_path / "run", tmp_path / "export"
    train(load_config(None, tiny_run(vision_dir("llava"), run, "data.format=sharegpt", "finetuning.lora_rank=4",
                                     data=image_data, batch_size=3, cutoff_len=256)))
    export(run, out)
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(image_data.parent / "images" / "blue.png")},
                                             {"type": "text", "text": "What colour is it?"}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                           add_generation_prompt=True)
    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    trained = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(vision_dir("llava")), run).eval()
    with torch.no_grad():
        assert torch.allclose(exported(**inputs).logits, trained(**inputs).logits, atol=1e-4)
