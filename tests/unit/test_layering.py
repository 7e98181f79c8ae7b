"""The rooms of the code (docs/architecture.md) import only downwards, and no module imports
itself back through others, at module level or inside a function.

Read from the source with `ast`, so a lazy import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "unipool_serve"
# room -> the rooms its modules may import (itself included)
ALLOWED = {
    "kernels": {"kernels"},
    "model_executor": {"kernels", "model_executor"},
    "server": {"kernels", "model_executor", "server", "models"},
    "tools": {"kernels", "model_executor", "tools"},
    "demo": {"kernels", "model_executor", "demo", "models"},
    "models": set(),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for room in ALLOWED for p in (ROOT / room).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `name` imports, resolved to the module (a `from pkg import mod` names mod)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t.startswith(PACKAGE + ".") and t in known}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) - {name} for name, path in modules.items()}


def _room(module: str) -> str:
    return module.split(".")[1]


def test_every_room_imports_only_the_rooms_below_it():
    upward = sorted(f"{m} imports {t}" for m, targets in _graph().items() for t in targets
                    if _room(t) not in ALLOWED[_room(m)])
    assert not upward, "\n".join(upward)


def test_no_import_cycle_lazy_or_not():
    graph = _graph()
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_the_graph_sees_lazy_imports():
    """Guards the reader itself: a function-level import must be an edge."""
    assert "unipool_serve.model_executor.steering.family_hooks" in \
        _graph()["unipool_serve.model_executor.steering.worker"]
