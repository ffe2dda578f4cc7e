"""The report package's imports flow one way: settings and labels <- numbers <- layout <- the writers of
each output <- writer. A module that reaches up the list would tangle the steps again."""

from __future__ import annotations

import ast
from pathlib import Path

import lokitool.report

# module -> step: a module may import only modules of an earlier step
STEP = {"settings": 0, "labels": 0, "numbers": 1, "layout": 2, "document": 3, "markdown": 3, "figures": 3, "tables": 3, "writer": 4}


def local_imports(path: Path) -> set[str]:
    """Sibling modules imported by `path` (`from .x import ...`, `from . import x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return found


def test_every_module_is_placed_and_imports_only_earlier_steps():
    folder = Path(lokitool.report.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    assert modules == set(STEP)
    assert local_imports(folder / "__init__.py") == set()
    for name in STEP:
        for imported in local_imports(folder / f"{name}.py"):
            assert STEP[imported] < STEP[name], f"report/{name}.py imports report/{imported}.py"
