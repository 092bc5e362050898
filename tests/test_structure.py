"""The package's import structure, read from its source: which module may import which.

The CLI is the top: it may import anything, and only the entry points (`python -m
probeserve`, the Ray job entrypoint) import it. What `probeserve demo` and the CLI both print
lives in `console`, so the demo imports that and `runners.base`, never the CLI, and the two
are not tangled in an import cycle (issue 12 item 6). Imports inside functions count: they
are how a lazy module still depends on another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import probeserve

PACKAGE = Path(probeserve.__file__).parent
ENTRY_POINTS = {"probeserve.__main__", "probeserve.job"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports, anywhere in it."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1 packages
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # `from probeserve import cli`
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_the_graph_reads_the_imports_it_should():
    graph = import_graph()
    assert "probeserve.cli" in graph["probeserve.__main__"]  # at module level
    assert "probeserve.demo" in graph["probeserve.cli"]  # inside cmd_demo
    assert "probeserve.runners.base" in graph["probeserve.runners.local"]  # `from probeserve.runners.base`


def test_only_the_entry_points_import_the_cli():
    graph = import_graph()
    assert {m for m, imported in graph.items() if "probeserve.cli" in imported} == ENTRY_POINTS


def test_the_demo_and_the_cli_are_in_no_import_cycle():
    graph = import_graph()
    for module in ("probeserve.cli", "probeserve.demo", "probeserve.console"):
        assert module not in reachable(graph, module), module
    assert {"probeserve.console", "probeserve.runners.base"} <= graph["probeserve.demo"]
