"""Rebuild tests/assets/tiny_tokenizer: a 600-token byte-level BPE with a ChatML template.

Run from the repo root: python tests/assets/make_tiny_tokenizer.py
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "tiny_tokenizer"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (ROOT / "src/peftkit/data/templates/chatml.jinja").read_text()


def corpus() -> list[str]:
    texts = []
    for record in json.loads((ROOT / "data/demo/alpaca_en_demo.json").read_text())[:300]:
        texts += [record["instruction"], record["input"], record["output"]]
    for record in json.loads((ROOT / "data/resume_ner/dev.json").read_text())[:200]:
        texts += [record["instruction"], record["input"], record["output"]]
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(OUT)
    print(f"{OUT}: vocab {len(fast)}")


if __name__ == "__main__":
    main()
