"""The package's layering, read from the source: no import cycles, and no module imports a higher layer
(``tests/unit/import_graph.py`` holds the layers; ``docs/architecture.md`` explains them)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from import_graph import LAYERS, cycles, graph, layer_of, upward  # noqa: E402

MAX_LINES = 450  # a module past this has more than one job; the aim is ~400


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_nothing_imports_a_higher_layer() -> None:
    assert upward(graph()) == []


def test_every_module_belongs_to_a_named_layer() -> None:
    named = {n for layer in LAYERS for n in layer}
    for module in graph():
        assert any(module == n or module.startswith(n + ".") for n in named), module


def test_the_checker_sees_upward_imports_and_cycles() -> None:
    # the checker itself must be able to fail: a ledger module importing the editor, and a 2-cycle
    edges = {"seqedit.ledger.session": {"seqedit.editor"}, "seqedit.editor": {"seqedit.ledger.session"}}
    assert layer_of("seqedit.ledger.session") < layer_of("seqedit.editor")
    assert upward(edges) == [("seqedit.ledger.session", "seqedit.editor")]
    assert cycles(edges) == [["seqedit.editor", "seqedit.ledger.session"]]


def test_modules_stay_small() -> None:
    src = Path(__file__).resolve().parents[2] / "src" / "seqedit"
    big = {str(p.relative_to(src)): n for p in src.rglob("*.py") if (n := len(p.read_text("utf-8").splitlines())) > MAX_LINES}
    assert big == {}
