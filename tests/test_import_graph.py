"""The package's import graph: no cycles, and no layer importing a higher one.

Every import counts, at module level, inside a function or under ``TYPE_CHECKING``: a cycle through a
function-level import still ties the modules together, and one edit away from failing at import time.

Also a script: ``python tests/test_import_graph.py`` prints every cycle and layer breach of the package
(exit status 1 if there is one).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "pgsandbox"

# bottom to top, as [tool.importlinter]'s layers contract in pyproject.toml: a module may import its own layer
# and the ones below it (siblings of one layer import neither each other)
LAYERS: list[tuple[str, ...]] = [
    ("pgsandbox.common",),
    ("pgsandbox.errors",),
    ("pgsandbox.settings",),
    ("pgsandbox.binaries",),
    ("pgsandbox.server",),
    ("pgsandbox.template",),
    ("pgsandbox.data", "pgsandbox.isolation"),
    ("pgsandbox.sandbox",),
    ("pgsandbox.drivers",),
    ("pgsandbox.pytest", "pgsandbox.cli"),
]


def modules(root: Path = SOURCE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__.py``)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """The package module that ``import name`` loads last: ``name`` itself, else its longest known prefix."""
    known = set(known)
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports(root: Path = SOURCE) -> dict[str, set[str]]:
    """For each module, the package modules it imports anywhere in its text."""
    known = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join([*package, *([base] if base else [])])
                # ``from a import b`` loads the module a.b when there is one, else takes a name of a
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            for target in targets:
                resolved = _resolve(target, known) if target.startswith(PACKAGE) else None
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def layer_of(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return level
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a lower layer imports a higher one, or a sibling of its own layer."""
    found = []
    for importer, targets in sorted(graph.items()):
        below = layer_of(importer)
        for target in sorted(targets):
            above = layer_of(target)
            sibling = above == below and target.split(".")[:2] != importer.split(".")[:2]
            if below is not None and above is not None and (above > below or sibling):
                found.append((importer, target))
    return found


def within(graph: dict[str, set[str]], prefix: str) -> dict[str, set[str]]:
    """The part of ``graph`` among the modules under ``prefix``."""

    def inside(name: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    return {name: {t for t in targets if inside(t)} for name, targets in graph.items() if inside(name)}


def test_the_server_layer_has_no_import_cycle() -> None:
    assert cycles(within(imports(), "pgsandbox.server")) == []


def test_the_server_layer_imports_no_higher_layer() -> None:
    graph = imports()
    assert [pair for pair in upward_imports(graph) if pair[0].startswith("pgsandbox.server")] == []


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    package = tmp_path / PACKAGE
    (package / "server").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "server" / "__init__.py").write_text("")
    (package / "server" / "base.py").write_text("from pgsandbox.server.roles import Login\n")
    (package / "server" / "roles.py").write_text("def f():\n    from .base import lock_id\n")
    (package / "server" / "leaf.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import os\n")
    (package / "template.py").write_text("import pgsandbox.server.leaf\n")
    (package / "server" / "up.py").write_text("from pgsandbox import template\n")
    graph = imports(tmp_path)
    assert cycles(graph) == [["pgsandbox.server.base", "pgsandbox.server.roles"]]
    assert upward_imports(graph) == [("pgsandbox.server.up", "pgsandbox.template")]


def main() -> int:
    graph = imports()
    found = cycles(graph)
    upward = upward_imports(graph)
    for component in found:
        print("cycle: " + " <-> ".join(component))
    for importer, target in upward:
        print(f"layer breach: {importer} imports {target}")
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(found)} cycles, {len(upward)} breaches")
    return 1 if found or upward else 0


if __name__ == "__main__":
    sys.exit(main())
