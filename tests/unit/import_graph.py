"""The import graph of the ``seqedit`` package, read from the source with :mod:`ast` (nothing is imported).

Every ``import`` counts, including those inside functions (lazy imports are still dependencies).
``python tests/unit/import_graph.py [SRC]`` prints the module-level edges, the cycles and the upward imports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Layers, lowest first: a module may import its own layer or a lower one, never a higher one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("seqedit.errors", "seqedit.atomic", "seqedit.paths", "seqedit.progress", "seqedit.version"),
    ("seqedit.linalg", "seqedit.facts", "seqedit.datasets", "seqedit.shared_data", "seqedit.models"),
    ("seqedit.methods", "seqedit.locate"),
    ("seqedit.bank",),
    ("seqedit.ledger",),
    ("seqedit.editor", "seqedit.editor_ledger", "seqedit.steps", "seqedit.pipeline", "seqedit.step_engine", "seqedit.rekey",
     "seqedit.guards",
     "seqedit.pending"),
    ("seqedit.evaluate", "seqedit.report", "seqedit.report_data", "seqedit.report_plots", "seqedit.testing",
     "seqedit.refresh"),
    ("seqedit.cli", "seqedit.serve", "seqedit"),
)


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def graph(src: Path = SRC) -> dict[str, set[str]]:
    """``{module: {seqedit modules it imports}}``; ``from pkg import name`` counts as importing
    ``pkg.name`` when that is a module, else ``pkg``."""
    files = {module_name(p, src): p for p in (src / "seqedit").rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                if t.split(".")[0] == "seqedit" and t != mod:
                    while t not in files and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t in files and t != mod:
                        edges[mod].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the longest prefix naming ``module`` (``seqedit`` itself is the top)."""
    best, rank = -1, len(LAYERS) - 1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, rank = len(n), i
    return rank


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a lower layer into a higher one."""
    return sorted((a, b) for a, bs in edges.items() for b in bs if layer_of(b) > layer_of(a))


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between top-level subpackages/modules (``seqedit.x``), for a readable picture."""
    def top(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for a, bs in edges.items():
        for b in bs:
            if top(a) != top(b):
                out.setdefault(top(a), set()).add(top(b))
    return out


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else SRC
    g = graph(src)
    for a, bs in sorted(package_edges(g).items()):
        print(f"{a} -> {', '.join(sorted(bs))}")
    print(f"\ncycles ({len(cycles(g))}):")
    for c in cycles(g):
        print("  " + " <-> ".join(c))
    up = upward(g)
    print(f"\nupward imports ({len(up)}):")
    for a, b in up:
        print(f"  {a} -> {b}")
