"""Imports point one way: the library never imports the studies; the scheduler knows no idode."""

import ast
from pathlib import Path

import idode

SRC = Path(idode.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_library_does_not_import_the_experiments():
    core = [
        p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] not in ("experiments", "cli")
    ]
    assert len(core) > 10
    for path in core:
        bad = {m for m in _imports(path) if m.startswith("idode.experiments")}
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_the_scheduler_is_generic():
    mods = _imports(SRC / "experiments" / "ablate" / "scheduler.py")
    assert not {m for m in mods if m.startswith("idode") or m.startswith("torch")}, mods
