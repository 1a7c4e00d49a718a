"""Images for the learning proof of image-text fine-tuning: which colour is the square.

Each 32 x 32 PNG holds one square of one of 8 colours (its side 7 to 13 pixels, anywhere in the picture) on a
light grey background with a little noise, and the question asks for its colour: 8 answers, chance 12.5%.
Nothing in the text tells them apart, so an answer above chance is read from the image; `--blank` writes the same
records with the square left out (the text-only control). Deterministic: the same arguments give the same bytes.

Colour and corner (16 answers) and colour and count were tried first with the same recipe on a 2-core CPU: the
colour was learned within 40 steps, the corner or the count not in 100 (a from-scratch tower learns where and how
many more slowly than what), so the proof asks what ten minutes here can teach.

    python scripts/make_image_data.py data/image_demo [--train 3000] [--dev 200] [--seed 0] [--blank]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 215), "yellow": (230, 200, 30),
           "purple": (130, 50, 170), "orange": (245, 140, 20), "black": (20, 20, 20), "brown": (120, 70, 30)}
QUESTIONS = ("What colour is the square?", "The square's colour?", "Which colour is the square?")  # short: cheap steps
SIZE = 32


def draw(rng: random.Random, colour: str, blank: bool):  # -> PIL.Image
    from PIL import Image

    image = Image.new("RGB", (SIZE, SIZE))
    image.putdata([tuple(235 + rng.randint(-12, 12) for _ in range(3)) for _ in range(SIZE * SIZE)])
    side = rng.randint(7, 13)
    x, y = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    if not blank:
        image.paste(COLOURS[colour], (x, y, x + side, y + side))
    return image


def write(out: Path, name: str, count: int, rng: random.Random, blank: bool, start: int) -> None:
    lines = []
    for n in range(start, start + count):
        colour = rng.choice(list(COLOURS))
        path = Path("images") / f"{n:06d}.png"
        draw(rng, colour, blank).save(out / path, optimize=False)
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image", "path": str(path)},
                                         {"type": "text", "text": rng.choice(QUESTIONS)}]},
            {"role": "assistant", "content": colour}]}))
    (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--dev", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blank", action="store_true", help="no square: the text-only control")
    args = p.parse_args()
    (args.out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    write(args.out_dir, "train", args.train, rng, args.blank, 0)
    write(args.out_dir, "dev", args.dev, rng, args.blank, args.train)
    print(f"{args.out_dir}: {args.train} train and {args.dev} dev records, images in {args.out_dir / 'images'}")


if __name__ == "__main__":
    main()
