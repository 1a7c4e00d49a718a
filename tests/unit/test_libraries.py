"""Every reach past a library's documented surface is listed in libraries.py's TOUCH_POINTS, with its guard; the
version guards say so when the installed libraries are outside the versions the touch points were written against."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from peftkit import libraries
from tests.helpers import REPO

SRC = REPO / "src" / "peftkit"
LIBRARIES = ("transformers", "peft", "torch", "bitsandbytes", "accelerate", "datasets", "tokenizers")
HOOKS = ("register_forward_hook", "register_forward_pre_hook", "mallopt")
LIBRARY_BASES = ("CacheLayerMixin", "AttentionInterface")


def _touches(path: Path) -> list[str]:
    """What in this module reaches into a library: a private name imported from one, a module's forward replaced,
    a hook on a library's module, a library class subclassed or a registry extended, glibc's malloc set."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
            found += [f"imports {a.name}" for a in node.names if a.name.startswith("_")]
            found += [f"imports {a.name}" for a in node.names if a.name in LIBRARY_BASES]
        elif isinstance(node, ast.Assign | ast.Delete):
            found += ["replaces .forward" for t in node.targets if isinstance(t, ast.Attribute) and t.attr == "forward"]
        elif isinstance(node, ast.Attribute) and node.attr in HOOKS:
            found.append(f"calls {node.attr}")
    return found


def test_every_library_touch_point_is_listed_with_its_guard() -> None:
    listed = {t.where.partition(":")[0] for t in libraries.TOUCH_POINTS}
    unlisted = {}
    for path in sorted(SRC.rglob("*.py")):
        module = "peftkit." + ".".join(path.relative_to(SRC).with_suffix("").parts)
        touches = _touches(path)
        if touches and module not in listed:
            unlisted[module] = touches
    assert unlisted == {}, "list these in libraries.py: TOUCH_POINTS, with a guard and the measured reason"
    for point in libraries.TOUCH_POINTS:
        module, _, name = point.where.partition(":")
        assert hasattr(importlib.import_module(module), name), point.where
        assert _touches(SRC.joinpath(*module.split(".")[1:]).with_suffix(".py")), f"{point.where} touches nothing"


def test_outside_the_tested_versions_each_version_guard_warns_once(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setitem(libraries.TESTED_VERSIONS, "transformers", ((4, 0), (4, 1)))  # as if transformers were newer
    monkeypatch.setattr(libraries, "_warned", set())
    with caplog.at_level("WARNING", logger="peftkit"):
        assert libraries.warn_untested("the engine", ("transformers",), "; its cache layer may not fit")
        assert libraries.warn_untested("the engine", ("transformers",))
        assert not libraries.warn_untested("peft's patches", ("peft",))
    assert caplog.text.count("the engine for transformers") == 1
    assert "(written against peft 0.17-0.21, transformers 4.0-4.0); its cache layer may not fit" in caplog.text


def test_the_generation_engine_warns_on_an_untested_transformers(monkeypatch: pytest.MonkeyPatch, caplog,
                                                                 tiny_model_dir: Path, tokenizer) -> None:
    from peftkit.config.schema import ModelArgs
    from peftkit.infer.engine import Engine
    from peftkit.model import load_model

    monkeypatch.setitem(libraries.TESTED_VERSIONS, "transformers", ((4, 0), (4, 1)))
    monkeypatch.setattr(libraries, "_warned", set())
    with caplog.at_level("WARNING", logger="peftkit"):
        Engine(load_model(ModelArgs(name_or_path=str(tiny_model_dir))), tokenizer, slots=1, max_len=16)
    assert "peftkit's generation engine for transformers" in caplog.text
