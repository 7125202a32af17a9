# pytest tests/test_structure.py -q
"""The package's shape: no import cycle among pmd's modules, and a training loop short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

PMD = Path(__file__).resolve().parent.parent / "pmd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PMD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The pmd modules `path` imports anywhere in it (module level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pmd.x import y` imports pmd.x, and pmd.x.y when y is a module
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PMD.rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        targets = imports(path, known)
        # importing pmd.a.b from outside pmd.a runs pmd/a/__init__.py first (inside it, the package is loaded)
        parents = {".".join(t.split(".")[:i]) for t in targets for i in range(2, t.count(".") + 1)}
        targets |= {p for p in parents & known if not name.startswith(p + ".")}
        graph[name] = targets - {name, "pmd"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_pmd():
    graph = import_graph()
    assert {"pmd.loop", "pmd.tasks", "pmd.memory.procedural", "pmd.experiments.compare"} <= graph.keys()
    assert "pmd.tasks.code" in graph["pmd.tasks"]  # the walk sees imports inside functions too
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_function_of_the_training_loop_is_over_60_lines():
    tree = ast.parse((PMD / "loop.py").read_text())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long
