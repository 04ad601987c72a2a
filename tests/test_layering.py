"""Module imports point one way: no import cycle anywhere in ``sts``, and the server and libraries
never import the development environment (``sts.dev``). Read from the source with ``ast``, so a
cycle hidden behind a function-level import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sts"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The ``sts`` modules ``path`` imports (``from sts.x import y`` counts as ``sts.x.y`` when that
    is a module, else ``sts.x``), anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if candidate in modules:
                    found.add(candidate)
                elif node.module in modules:
                    found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in paths.items()}


def test_there_is_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycle = [*trail[trail.index(target) :], target] if target in trail else [node, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


def test_the_server_never_imports_the_development_environment() -> None:
    offenders = {
        name: sorted(t for t in targets if t == "sts.dev" or t.startswith("sts.dev."))
        for name, targets in graph().items()
        if not (name == "sts.dev" or name.startswith("sts.dev.")) and name != "sts.cli"
    }
    assert not {k: v for k, v in offenders.items() if v}
