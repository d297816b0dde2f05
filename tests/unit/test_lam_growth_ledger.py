"""A λ schedule journalled by a ledger (issue 30, ``lam_growth``): every step that changes the facts in
force re-forms λ for the facts in force after it and records it, so after any apply, replacement,
forget or undo the weights are the one-time solution of the facts in force under their λ_N, ``verify``
agrees, and a reopened ledger replays (or loads a snapshot at) the recorded λ bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ledger_helpers import LAYERS, apply_facts, columns, fact, make_editor, ote_gap

from seqedit import Editor, LedgerError
from seqedit.datasets import load_facts
from seqedit.shared_data import counterfact_path
from seqedit.testing import tiny_model

GROWTH = 2  # λ_N = 10·max(1, N/2)


def lam_of(n: int) -> float:
    return 10.0 * max(1.0, n / GROWTH)


def check(ed: Editor, in_force: list[str]) -> None:
    """The editor's facts in force are ``in_force``, at λ_N, and its weights their one-time solution."""
    assert sorted(f.id for f in ed.facts_in_force()) == sorted(in_force)
    lam = lam_of(len(in_force))
    assert ed.bank.lam == lam and all(s.lam == lam for s in ed.systems.values())
    assert ed.ledger.step(ed.ledger.last_step).info["lam"] == lam
    assert ote_gap(ed, in_force) < 1e-9
    rep = ed.verify()
    assert rep.ok and all(e["rel_error"] < 1e-9 for e in rep.layers.values()), rep.problems()


def scheduled_history(path: Path, **kw) -> Editor:
    ed = make_editor(path, lam_growth=GROWTH, **kw)
    apply_facts(ed, [fact(0), fact(1)])  # 1: N = 2, λ = 10
    check(ed, ["f0-0", "f1-0"])
    apply_facts(ed, [fact(2), fact(3), fact(4)])  # 2: N = 5, λ = 25
    check(ed, ["f0-0", "f1-0", "f2-0", "f3-0", "f4-0"])
    apply_facts(ed, [fact(0, 1)])  # 3: replaces f0-0, N = 5
    check(ed, ["f0-1", "f1-0", "f2-0", "f3-0", "f4-0"])
    ed.forget(["f2-0", "f3-0"])  # 4: N = 3, λ = 15
    check(ed, ["f0-1", "f1-0", "f4-0"])
    ed.undo(4)  # 5: N = 5
    check(ed, ["f0-1", "f1-0", "f2-0", "f3-0", "f4-0"])
    apply_facts(ed, [fact(5), fact(6), fact(7)])  # 6: N = 8, λ = 40
    check(ed, ["f0-1", "f1-0", "f2-0", "f3-0", "f4-0", "f5-0", "f6-0", "f7-0"])
    ed.undo(6)  # 7: back to N = 5
    check(ed, ["f0-1", "f1-0", "f2-0", "f3-0", "f4-0"])
    return ed


def test_every_operation_leaves_the_one_time_solution_under_lam_n(tmp_path: Path) -> None:
    ed = scheduled_history(tmp_path / "L")
    ed.close()


@pytest.mark.parametrize("snapshot_every", [1, 3, 100])
def test_reopen_restores_the_scheduled_weights_bitwise(tmp_path: Path, snapshot_every: int) -> None:
    ed = scheduled_history(tmp_path / "L", snapshot_every=snapshot_every)
    live = {l: ed.master[l].clone() for l in LAYERS}
    ed.close()
    lm = tiny_model("llama")
    again = make_editor(tmp_path / "L", lm=lm, lam_growth=GROWTH)
    assert again.bank.lam == 25.0 and all(s.lam == 25.0 for s in again.systems.values())
    for l in LAYERS:
        assert torch.equal(again.master[l], live[l]), l
    apply_facts(again, [fact(8)])  # continues under the schedule: N = 6, λ = 30
    check(again, ["f0-1", "f1-0", "f2-0", "f3-0", "f4-0", "f8-0"])
    again.close()


def test_a_ledger_step_equals_the_ledger_free_step_bit_for_bit(tmp_path: Path) -> None:
    ledgered = make_editor(tmp_path / "L", lam_growth=GROWTH, kv_dtype="float64")
    free = Editor(tiny_model("llama"), layers=LAYERS, stats_tokens=2000, lam=10.0, lam_growth=GROWTH)
    for batch in ([fact(0)], [fact(1), fact(2)], [fact(3), fact(4), fact(5)]):
        apply_facts(ledgered, batch)
        free.apply_kv(*columns([f.id for f in batch], free.w0 or ledgered.w0))
        assert ledgered.bank.lam == free.bank.lam
        for l in LAYERS:
            assert torch.equal(ledgered.master[l], free.master[l])
    assert free.bank.lam == 30.0
    ledgered.close()


def test_a_scheduled_ledger_keeps_its_schedule_and_refuses_another(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L", lam_growth=GROWTH)
    apply_facts(ed, [fact(0), fact(1), fact(2)])
    ed.close()
    with pytest.raises(LedgerError, match=r"lam_growth: ledger 2, given 0"):
        make_editor(tmp_path / "L", lam_growth=0)
    again = make_editor(tmp_path / "L")  # the ledger's own schedule
    assert again.hparams.lam_growth == GROWTH and again.bank.lam == 15.0
    apply_facts(again, [fact(3)])
    check(again, ["f0-0", "f1-0", "f2-0", "f3-0"])
    again.close()


def test_a_failed_scheduled_step_leaves_lam_weights_and_ledger_unchanged(tmp_path: Path, monkeypatch) -> None:
    import seqedit.step_engine

    ed = make_editor(tmp_path / "L", lam_growth=GROWTH)
    facts = load_facts(counterfact_path(), limit=5)
    ed.apply(facts[:2])  # N = 2: λ = 10
    masters, last = {l: ed.master[l].clone() for l in LAYERS}, ed.ledger.last_step
    calls = []

    def fail_on_the_second_layer(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # after λ was re-formed and the first layer written
            raise RuntimeError("solve failed")
        return real(*a, **k)

    real = seqedit.step_engine.LayerBank.update
    monkeypatch.setattr(seqedit.step_engine.LayerBank, "update", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="solve failed"):
        ed.apply(facts[2:])  # would be N = 5: λ = 25
    monkeypatch.undo()
    assert ed.bank.lam == 10.0 and all(s.lam == 10.0 for s in ed.systems.values())
    assert all(torch.equal(ed.master[l], masters[l]) for l in LAYERS) and ed.ledger.last_step == last
    rep = ed.apply(facts[2:])  # the retry: values optimised on the re-formed model, then solved under λ = 25
    assert ed.bank.lam == 25.0 and ed.ledger.step(rep.id).info["lam"] == 25.0
    assert ed.verify().ok
    ed.close()
