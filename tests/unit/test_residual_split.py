"""The residual split over the edited layers (``EditHParams.residual_split``, issue 30): layer i of L is
asked for ``1/residual_divisor(i)`` of what is still to place. At 1 it is MEMIT's ``R/(L − i)``, exactly; a
larger split asks the lower layers for more and leaves the top layer less; the split is applied the same way
by a step and by a rekey, so a rekey under it is still the one-time edit of the facts in force."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_helpers import EDITOR_KW, LAYERS, frozen_cf_targets, make_editor

from seqedit import Editor
from seqedit.datasets import load_facts
from seqedit.models.presets import EditHParams
from seqedit.shared_data import counterfact_path
from seqedit.testing import tiny_model

@given(n=st.integers(1, 12))
def test_split_one_is_memits_exactly(n: int) -> None:
    hp = EditHParams(layers=tuple(range(n)))
    assert [hp.residual_divisor(i) for i in range(n)] == [float(n - i) for i in range(n)]


@settings(max_examples=200)
@given(n=st.integers(1, 12), g=st.floats(0.05, 20.0))
def test_shares_place_the_whole_residual_in_geometric_proportions(n: int, g: float) -> None:
    """If every layer placed exactly what it is asked for, layer i would place w_i / Σw of the step's residual
    (w_i = g^(−i)), nothing would be left after the top layer, and a larger g asks the bottom layer for more."""
    hp = EditHParams(layers=tuple(range(n)), residual_split=g)
    left, placed = 1.0, []
    for i in range(n):
        placed.append(left / hp.residual_divisor(i))
        left -= placed[-1]
    w = [g ** -i for i in range(n)]
    assert placed == pytest.approx([x / sum(w) for x in w], rel=1e-9, abs=1e-12)
    assert abs(left) < 1e-9 and hp.residual_divisor(n - 1) == 1.0
    if n > 1:
        more = EditHParams(layers=tuple(range(n)), residual_split=g * 1.5)
        assert 1 / more.residual_divisor(0) > 1 / hp.residual_divisor(0)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "2"])
def test_a_bad_split_is_refused_by_name(bad) -> None:
    with pytest.raises(ValueError, match="residual_split"):
        EditHParams(layers=(1, 2), residual_split=bad)


@pytest.fixture(scope="module")
def facts():
    return load_facts(counterfact_path(), limit=6)


@pytest.fixture(scope="module")
def targets(facts):
    return frozen_cf_targets(facts)


def _updates(ed: Editor) -> dict[int, float]:
    return {l: float((ed.master[l] - ed.bank.w0[l]).norm()) for l in LAYERS}


def test_a_larger_split_moves_the_edit_down_and_a_rekey_applies_it_too(tmp_path: Path, facts, targets) -> None:
    memit = Editor(tiny_model("llama"), mode="one_time", **EDITOR_KW)
    memit.run(facts, values=targets)
    lower = Editor(tiny_model("llama"), mode="one_time", residual_split=4.0, **EDITOR_KW)
    lower.run(facts, values=targets)
    a, b = _updates(memit), _updates(lower)
    bottom, top = LAYERS
    assert b[bottom] > 1.2 * a[bottom] and b[top] < a[top]

    ed = make_editor(tmp_path / "L", residual_split=4.0)
    ed.run(facts, batch_size=2, values=targets)
    ed.rekey()  # the rekey re-solves under the editor's split: the one-time edit with that split
    assert max(float((ed.master[l] - lower.master[l]).norm() / lower.master[l].norm()) for l in LAYERS) < 1e-9
    assert ed.verify().ok
    ed.close()
