"""Images in records and requests: where they are read from, what is refused, and the processor facts about them.

An image is referred to by a string: an absolute local path (a record's relative path is resolved against its
dataset file when the record is read) or a `data:` URL. Nothing is ever fetched from the network. The samples carry
these references (JSON travels to worker processes and the cache); the pixels are read when a batch is built.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from pathlib import Path
from typing import Any

MAX_IMAGE_BYTES = 32 * 2**20  # a file or data: URL larger than this is refused (a record, a request)
MAX_IMAGE_PIXELS = 4096 * 4096  # width x height above this is refused (PIL's own bomb guard is at 89M pixels)
PLACEHOLDER = "<image>"  # LLaMA-Factory's sharegpt / alpaca placeholder for the record's `images`, in order

# Processor attributes that name a token belonging to an image (never supervised, never cut): image / soft tokens,
# vision start / end, begin / end of image, Idefics3's fake-image and global-image tokens.
_IMAGE_TOKEN_ATTRIBUTES = ("image_token", "boi_token", "eoi_token", "vision_start_token", "vision_end_token",
                           "fake_image_token", "global_image_token", "global_image_tag", "image_start_token",
                           "image_end_token", "video_token", "start_image_token", "end_image_token",
                           "image_break_token")
# Added special tokens whose text says they belong to an image (Qwen2.5-VL's <|vision_start|>, which its processor
# does not name; Gemma 3's <image_soft_token>, named by its tokenizer only).
_IMAGE_WORDS = re.compile(r"image|vision|img|video", re.IGNORECASE)


def resolve(ref: str, base: Path | None) -> str:
    """The reference as it is stored: a data: URL unchanged, a path made absolute against `base` (the dataset's
    folder). ValueError for a remote URL: records and requests never make peftkit fetch anything."""
    if ref.startswith("data:"):
        return ref
    if ref.startswith(("http://", "https://", "ftp://")):
        raise ValueError(f"{ref[:80]!r} is a remote URL; peftkit reads only local files and data: URLs "
                         "(download the image and give its path)")
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return str(path)


def _bytes(ref: str) -> bytes:
    if ref.startswith("data:"):
        head, _, payload = ref.partition(",")
        if ";base64" not in head:
            raise ValueError("a data: URL image must be base64 encoded (data:image/png;base64,...)")
        if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
            raise ValueError(f"the data: URL image is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the data: URL is not valid base64") from None
    path = Path(ref)
    if not path.is_file():
        raise ValueError(f"image file {ref} does not exist")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"image file {ref} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    return path.read_bytes()


def load_image(ref: str) -> Any:
    """The image as an RGB PIL image; ValueError naming what is wrong (missing, unreadable, oversized)."""
    from PIL import Image, UnidentifiedImageError

    data = _bytes(ref)
    shown = ref if not ref.startswith("data:") else "the data: URL image"
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{shown} is {image.width}x{image.height}, more than the {MAX_IMAGE_PIXELS:,} pixels "
                             "allowed; resize it")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{shown} is not a readable image ({type(e).__name__})") from None


def digest(refs: list[str]) -> str:
    """A digest of the images' bytes (the data cache's key: an image changed in place rebuilds it)."""
    h = hashlib.sha256()
    for ref in refs:
        h.update(hashlib.sha256(_bytes(ref)).digest())
    return h.hexdigest()


def image_token_ids(processor: Any) -> set[int]:
    """The ids of the tokens that stand for an image or frame one (never supervised), from the processor's names."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids: set[int] = set()
    for attribute in _IMAGE_TOKEN_ATTRIBUTES:
        token = getattr(processor, attribute, None)
        if isinstance(token, str) and token:
            found = tokenizer.convert_tokens_to_ids(token)
            if isinstance(found, int) and found != tokenizer.unk_token_id:
                ids.add(found)
    for attribute in ("image_token_id", "video_token_id", "boi_token_id", "eoi_token_id"):
        value = getattr(processor, attribute, None)
        if isinstance(value, int):
            ids.add(value)
    for token, token_id in tokenizer.get_added_vocab().items():
        if (token.startswith("<row_") and "_col_" in token) or (  # Idefics3's tile tokens
                token in tokenizer.all_special_tokens and _IMAGE_WORDS.search(token)):
            ids.add(token_id)
    return ids


def soft_token_id(processor: Any) -> int | None:
    """The id of the token each image feature replaces (Gemma 3's processor names its begin-of-image token
    `image_token`; its tokenizer names the soft token)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    for owner in (tokenizer, processor):
        value = getattr(owner, "image_token_id", None)
        if isinstance(value, int):
            return value
    return None
