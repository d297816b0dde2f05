"""Rekey (``seqedit.rekey``): re-reading every fact's keys on the current model and re-solving from W₀ is
the one-time edit of the facts in force, is journalled so a reopen restores it, and composes with undo,
forget and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ledger_helpers import EDITOR_KW, LAYERS, frozen_cf_targets, apply_facts, fact, make_editor

from seqedit import Editor, LedgerError, SeqEditError
from seqedit.datasets import load_facts
from seqedit.shared_data import counterfact_path
from seqedit.testing import tiny_model

KW = EDITOR_KW


@pytest.fixture(scope="module")
def facts():
    return load_facts(counterfact_path(), limit=8)


@pytest.fixture(scope="module")
def targets(facts):
    return frozen_cf_targets(facts)


def _rel(A: dict, B: dict) -> float:
    return max(float((A[l] - B[l]).norm() / B[l].norm()) for l in LAYERS)


def _masters(ed: Editor) -> dict[int, torch.Tensor]:
    return {l: ed.master[l].clone() for l in LAYERS}


def test_rekey_is_the_one_time_edit_of_the_facts_in_force(tmp_path: Path, facts, targets) -> None:
    ed = make_editor(tmp_path / "L")
    ed.run(facts, batch_size=2, values=targets)  # four steps on the same z as the one-time edit below
    sequential = _masters(ed)
    rec = ed.rekey()
    assert rec.kind == "rekey" and rec.id == 5 and len(rec.added) == len(rec.removed) == 8
    assert set(rec.info["residual_norms"]) == {str(l) for l in LAYERS} and rec.info["final_residual"] >= 0
    assert ed.ledger.snapshot_steps()[-1] == 5  # always snapshotted
    rekeyed = _masters(ed)

    one = Editor(tiny_model("llama"), mode="one_time", **KW)
    one.run(facts, values=targets)
    ote = _masters(one)
    # the sequential steps froze keys read before later steps moved the lower layer: they are not the
    # one-time edit; the rekey is, to rounding
    assert _rel(sequential, ote) > 1e-4
    assert _rel(rekeyed, ote) < 1e-9
    assert [f.id for f in ed.facts_in_force()] == [f.id for f in facts]
    assert ed.verify().ok
    ed.close()

    again = make_editor(tmp_path / "L")  # reopen: the snapshot after the rekey, bit for bit
    assert all(torch.equal(again.master[l], rekeyed[l]) for l in LAYERS)
    again.apply(facts[:1], values=targets.value_result(0, 1))  # a replacement after the rekey
    assert again.verify().ok
    again.close()


def test_a_rekey_step_replays_exactly(tmp_path: Path, facts, targets) -> None:
    ed = make_editor(tmp_path / "L", snapshot_every=100)
    ed.run(facts[:4], batch_size=2, values=targets)
    ed.rekey()
    ed.apply(facts[4:6], values=targets.value_result(4, 6))
    live = _masters(ed)
    ed.close()
    with Editor(tiny_model("llama"), ledger=tmp_path / "L") as again:
        # restore loads the rekey's snapshot; drop it to force a replay of the rekey itself
        again.bank.init()
        for rec in again.ledger.steps():
            again.session._replay(rec)
        assert all(torch.equal(again.master[l], live[l]) for l in LAYERS)


def test_undo_and_forget_reach_facts_through_their_rekeyed_rows(tmp_path: Path, facts, targets) -> None:
    ed = make_editor(tmp_path / "L")
    ed.run(facts[:6], batch_size=2, values=targets)
    before = _masters(ed)
    rekey = ed.rekey()
    assert _rel(_masters(ed), before) > 1e-6
    # undo of the rekey: the facts take back the keys they had, and so the weights
    ed.undo(rekey)
    assert _rel(_masters(ed), before) < 1e-9 and ed.verify().ok
    redo = ed.undo(ed.last_record if ed.last_record.kind == "undo" else ed.ledger.last_step)
    assert redo.kind == "undo" and ed.verify().ok
    # undo of a step written before the rekey removes its facts, whose rows the rekey re-made
    ed.undo(2)
    assert [f.id for f in ed.facts_in_force()] == [facts[i].id for i in (0, 1, 4, 5)]
    ed.forget([facts[0].id])
    assert [f.id for f in ed.facts_in_force()] == [facts[i].id for i in (1, 4, 5)]
    assert ed.verify().ok
    ed.close()


def test_run_rekeys_every_k_apply_steps(tmp_path: Path, facts, targets) -> None:
    ed = make_editor(tmp_path / "L")
    seen = []

    class Spy:
        def on_step_end(self, editor, report, position):
            seen.append(editor.ledger.step(editor.ledger.last_step).kind)

    ed.callbacks.append(Spy())
    ed.run(facts[:6], batch_size=2, values=targets, rekey_every=2)
    assert [s.kind for s in ed.ledger.steps()] == ["apply", "apply", "rekey", "apply"]
    assert seen == ["apply", "rekey", "apply"]  # callbacks measure the rekeyed model
    ed.close()
    with pytest.raises(ValueError, match="rekey_every"):
        Editor(tiny_model("llama"), **KW).run(facts[:2], rekey_every=-1)
    with pytest.raises(SeqEditError, match="needs a ledger"):
        Editor(tiny_model("llama"), **KW).run(facts[:2], rekey_every=1)


def test_rekey_refusals(tmp_path: Path, facts, targets) -> None:
    ed = make_editor(tmp_path / "empty")
    with pytest.raises(LedgerError, match="no facts in force"):
        ed.rekey()
    ed.close()
    given = make_editor(tmp_path / "kv")  # keys and values given: no z-layer targets to re-solve from
    apply_facts(given, [fact(0)])
    with pytest.raises(LedgerError, match="step 1 stores no z-layer targets"):
        given.rekey()
    assert given.ledger.last_step == 1
    given.close()
    naive = make_editor(tmp_path / "naive", alignment="naive")
    naive.apply(facts[:2], values=targets.value_result(0, 2))
    with pytest.raises(SeqEditError, match="memit/naive does not keep the one-time solution.*memit/aligned"):
        naive.rekey()
    naive.close()


def test_cli_rekey(tmp_path: Path, facts, targets, monkeypatch) -> None:
    import json

    from typer.testing import CliRunner

    from seqedit import cli
    from seqedit import editor as editor_mod

    ed = make_editor(tmp_path / "L")
    ed.run(facts[:4], batch_size=2, values=targets)
    ed.undo(2)
    ed.close()
    kv = make_editor(tmp_path / "kv")
    apply_facts(kv, [fact(0)])
    kv.close()
    monkeypatch.setattr(editor_mod, "load_model", lambda name, **kw: tiny_model("llama"))
    monkeypatch.setattr("seqedit.models.load.model_config", lambda name: (name, None))
    run = CliRunner().invoke
    r = run(cli.app, ["rekey", "--ledger", str(tmp_path / "L")])
    assert r.exit_code == 0 and "step 4 (rekey): 2 facts re-read and re-solved" in r.output, r.output
    r = run(cli.app, ["rekey", "--ledger", str(tmp_path / "L"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["kind"] == "rekey"
    r = run(cli.app, ["log", "--ledger", str(tmp_path / "L"), "--json"])
    # the facts of step 1 are carried by step 5's rows; log says when each was first edited
    assert [(f["added"], f["first_added"]) for f in json.loads(r.output)["in_force"]] == [(5, 1), (5, 1)]
    r = run(cli.app, ["log", "--ledger", str(tmp_path / "L")])
    assert r.exit_code == 0 and "1 (rekeyed at 5)" in r.output
    r = run(cli.app, ["undo", "4", "--ledger", str(tmp_path / "L")])  # planned through the rekeyed rows
    assert r.exit_code == 0 and "step 6 (undo of step 4)" in r.output, r.output
    r = run(cli.app, ["rekey", "--ledger", str(tmp_path / "kv")])  # refused before the model loads
    assert r.exit_code == 2 and "step 1 stores no z-layer targets" in " ".join(r.output.split())
