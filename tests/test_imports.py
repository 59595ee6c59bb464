"""The import graph of skillstream/ has no cycle, counting imports inside functions too (a cycle
hidden in a function-level import is still two modules that need each other), and no module
imports another module's private name."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "skillstream"
ROOT = PACKAGE.parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported names, line) for every import of a skillstream module in the file,
    at any depth: module level, in functions and classes."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "skillstream":
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "skillstream":
                continue
            for alias in node.names:  # `from package import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                yield (sub, [], node.lineno) if sub in modules else (target, [alias.name], node.lineno)


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {module it imports: line of the first such import}}, skillstream modules only."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for target, _, line in _imports(name, path, modules):
            if target in modules and target != name:
                edges.setdefault(target, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "skillstream.errors" in graph["skillstream.data.readers"]       # from ..errors import (module level)
    assert "skillstream.run_lock" in graph["skillstream.cli"]              # from .run_lock import (in a function)
    assert "skillstream.evaluation.suite" in graph["skillstream.stage_plan"]  # from .evaluation.suite import


def test_skillstream_has_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} imports {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle: " + " -> ".join(cycle) + "\n  " + "\n  ".join(steps))


def test_no_private_name_is_imported_from_another_module():
    modules = _modules()
    found = []
    for folder in (PACKAGE, ROOT / "bench", ROOT / "tests"):
        for path in sorted(folder.rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for target, names, line in _imports(name, path, modules):
                found += [f"{path.relative_to(ROOT)}:{line}: {n} from {target}"
                          for n in names if n.startswith("_") and not n.startswith("__")]
    assert not found, "private names imported across modules:\n  " + "\n  ".join(found)
