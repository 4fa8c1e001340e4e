"""The shape of the package: data flows one way (config -> model -> task -> rows -> report), so the module-level
import graph has no cycle and nothing below the runner imports it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "enhance_long"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports at module level (``from a import b`` names a.b when it is a module)."""
    files = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("enhance_long"):
                modules = {f"{node.module}.{a.name}" for a in node.names} & set(files)
                deps |= modules or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & set(files)
        graph[name] = deps - {name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles


def test_nothing_below_the_runner_imports_it():
    assert [m for m, deps in import_graph().items() if "enhance_long.runner" in deps] == []
