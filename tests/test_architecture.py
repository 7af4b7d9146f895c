"""The package's import graph has no cycles.

Every ``import`` / ``from ... import`` in ``surgeon/`` counts, at module level and inside
functions alike (a function-level import still ties the two modules together), so each module
can be read, tested and moved with only what it imports below it.

Modules named by a string and loaded with ``importlib`` are not imports of the namer: the
registry's ``"module:Class"`` lines and a variant's ``lowering_module`` point *down* to code
that imports them (a variant's ``lowering.py`` imports the variant), never the reverse.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "surgeon"

# Cycles known today and owned elsewhere; remove a pair here once it is broken.
KNOWN_CYCLES: set[frozenset[str]] = set()  # none: `surgeon build` sits above the API


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The surgeon module a dotted name refers to (a module, or a name defined in one)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the surgeon modules it imports (anywhere in its source)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            for t in targets:
                dep = _resolve(t, modules)
                if dep is not None and dep != mod and not mod.startswith(dep + "."):
                    graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reads_function_level_imports():
    g = import_graph()
    # surgeon.kernels.dispatch imports the Triton kernel inside a function only
    assert "surgeon.kernels.triton_blocksparse" in g["surgeon.kernels.dispatch"]
    assert "surgeon.errors" in g["surgeon.kernels.geometry"]


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_surgeon():
    cycles = [c for c in _cycles(import_graph()) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, "import cycles in surgeon/: " + "; ".join(" <-> ".join(c) for c in cycles)
