"""The packages' order from the ground up, checked on every import in src (function-level ones included).

A module may import its own floor and the floors below; an import that points up fails here. The stage table
(floor 0) names its callables as strings, loaded when used: they are checked to exist below.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

SRC = REPO / "src" / "peftkit"
# floor of each top-level module or package of peftkit (README "Layout" shows the same order)
FLOORS = {
    "errors": 0, "constants": 0, "atomic": 0, "stages": 0, "hosts": 0, "libraries": 0,
    "config": 1, "rundir": 1,
    "model": 2,
    "data": 3,
    "infer": 4,
    "eval": 5, "export": 5, "serve": 5, "objectives": 5,
    "train": 6,
    "board": 7,
    "cli": 8, "__init__": 8, "__main__": 8,
}


def _imports(path: Path) -> set[str]:
    """The peftkit packages a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("peftkit.")}
    return found


def test_every_module_has_a_floor() -> None:
    tops = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.rglob("*.py")}
    assert tops <= FLOORS.keys(), f"give these a floor in FLOORS (and README Layout): {sorted(tops - FLOORS.keys())}"


def test_imports_point_down_the_floors() -> None:
    upward: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        floor = FLOORS[rel.split("/")[0].removesuffix(".py")]
        above = {p for p in _imports(path) if FLOORS[p] > floor}
        if above:
            upward[rel] = above
    assert upward == {}, f"imports above their floor (move the code down, or the check to train/preflight.py): {upward}"


def test_the_stage_table_names_functions_that_exist() -> None:
    """stages.py (floor 0) names each stage's functions as "module:function" strings, loaded when used."""
    import importlib

    from peftkit.stages import STAGES

    for name, entry in STAGES.items():
        for field in ("objective", "scorer", "metrics"):
            target = getattr(entry, field, None)
            if isinstance(target, str):
                module, _, function = target.partition(":")
                assert hasattr(importlib.import_module(module), function), f"stage {name}.{field}: {target}"
