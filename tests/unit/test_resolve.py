"""Model resolution: the embedded model's conversion is atomic; unreachable hub ids fail with advice."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.config.schema import ModelArgs
from peftkit.errors import ModelError
from peftkit.model import load_model, load_tokenizer, resolve
from peftkit.model.resolve import ensure_embedded_model


def test_interrupted_conversion_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path))

    def die(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(resolve, "_convert_gguf", die)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded_model()
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # neither the target nor the temporary folder remains


def test_conversion_happens_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path))
    calls = []

    def fake(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(resolve, "_convert_gguf", fake)
    first = ensure_embedded_model()
    assert ensure_embedded_model() == first and len(calls) == 1
    assert (first / "config.json").is_file()


@pytest.mark.slow
def test_unreachable_hub_id_suggests_a_local_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: the variable alone still tried the network
    with pytest.raises(ModelError, match=r"not a local folder, and loading it as a hub id failed .* Give a local folder"):
        load_tokenizer(ModelArgs(name_or_path="some-org/some-model-that-is-not-here"))


def test_local_folder_without_weights(tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(ModelError, match="could not load the model from this folder"):
        load_model(ModelArgs(name_or_path=str(tmp_path)))


def test_missing_pad_token_becomes_eos(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(ModelArgs(name_or_path=str(tiny_model_dir)))
    assert tok.pad_token is not None and tok.padding_side == "right"
