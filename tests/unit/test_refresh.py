"""Refresh: the faded facts of a ledger are found, re-edited oldest first with their old constraints
replaced exactly, within a budget, and the ledger stays verifiable."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqedit import Editor, Fact
from seqedit.errors import SeqEditError
from seqedit.evaluate.scoring import score_targets
from seqedit.locate.values import compute_values
from seqedit.refresh import refresh, winning
from seqedit.testing import tiny_model

# prompts that end on the subject, one-token targets: a random tiny model can be edited to say them
FIRST = [Fact("The favourite word of {}", "Danielle Darrieux", "music", "time", id="a1"),
         Fact("In the notes of {}", "Michael Jordan", "city", "year", id="a2"),
         Fact("The capital city of {}", "Italy", "first", "new", id="a3")]
LATER = [Fact("The rival of {}", "Windows 95", "time", "two", id="b1"),
         Fact("The last word of {}", "Ada Lovelace", "year", "city", id="b2"),
         Fact("The home of {}", "Alan Turing", "new", "first", id="b3")]
HP = dict(layers=(1, 2), stats_tokens=2000, v_steps=20, v_lr=0.05, lam=1e-2, clamp_norm_factor=8.0,
          v_weight_decay=0.0, kl_factor=0.0, early_stop_loss=-1.0, stop_rule="most_probable")


def _editor(path: Path, **kw) -> Editor:
    return Editor(tiny_model("llama", hidden=64, intermediate=128), ledger=path, **(HP | kw))


def _faded_ledger(editor: Editor) -> None:
    """FIRST edited for real; LATER committed with values that leave the model as it was (z = h0, as
    if their values had been optimised on a model that no longer exists): in force, but not won."""
    editor.apply(FIRST)
    assert all(winning(editor.loaded, FIRST)), "the first facts must win once edited"
    still = compute_values(editor.loaded, LATER, ["{}"], editor.hparams.override(v_steps=1))
    editor.apply(LATER, values=still)
    assert not any(winning(editor.loaded, LATER))


def test_winning_is_the_argmax_rule_or_the_true_answer_comparison() -> None:
    lm = tiny_model("llama", hidden=64, intermediate=128)
    facts = FIRST + LATER
    new = score_targets(lm, [(f.text, f.target) for f in facts])
    true = score_targets(lm, [(f.text, f.true_target) for f in facts])
    assert winning(lm, facts) == [s.exact for s in new]
    assert winning(lm, facts, criterion="vs_true") == [a.mean_nll < b.mean_nll for a, b in zip(new, true)]
    no_true = [Fact(f.prompt, f.subject, f.target, id=f.id) for f in facts]  # falls back to the argmax rule
    assert winning(lm, no_true, criterion="vs_true") == [s.exact for s in new]
    with pytest.raises(ValueError, match="criterion must be one of most_probable, vs_true"):
        winning(lm, facts, criterion="likely")


def test_refresh_re_edits_the_faded_facts_and_replaces_their_constraints(tmp_path: Path) -> None:
    editor = _editor(tmp_path / "L")
    _faded_ledger(editor)
    faded_before = [f.id for f, w in zip(FIRST + LATER, winning(editor.loaded, FIRST + LATER)) if not w]
    assert faded_before == ["b1", "b2", "b3"]
    rows_before = {r.fact.id: r.row for r in editor.ledger.in_force()}

    rep = refresh(editor, batch_size=2)
    assert rep.in_force == 6 and rep.faded == len(faded_before)
    order = [r.fact.id for r in sorted(editor.ledger.in_force(), key=lambda r: r.row)]
    assert rep.refreshed == faded_before  # oldest first: the order in which they were edited
    assert len(rep.steps) == -(-len(faded_before) // 2) and rep.stopped == "done"
    rows_after = {r.fact.id: r.row for r in editor.ledger.in_force()}
    assert set(rows_after) == set(rows_before)  # the same facts in force, one row each
    for fid in rows_before:  # a refreshed fact's old row left, the others kept theirs
        assert (rows_after[fid] != rows_before[fid]) == (fid in faded_before), fid
    assert order[-len(faded_before):] == faded_before
    assert rep.still_faded == sum(not w for w in winning(editor.loaded, [f for f in FIRST + LATER
                                                                         if f.id in faded_before]))
    assert rep.still_faded == 0  # re-edited on the current model, they win
    assert editor.verify().ok  # the weights are the one-time solution of the facts now in force
    editor.close()


def test_refresh_keeps_to_its_budget_and_goes_on_where_it_stopped(tmp_path: Path) -> None:
    editor = _editor(tmp_path / "L")
    _faded_ledger(editor)
    n_faded = refresh(editor, max_facts=0).faded
    assert n_faded == 3
    steps = editor.ledger.last_step
    assert refresh(editor, max_seconds=0).refreshed == [] and editor.ledger.last_step == steps
    first = refresh(editor, max_facts=1, recheck=False)
    assert len(first.refreshed) == 1 and first.still_faded is None
    assert first.refreshed == ["b1"] and first.stopped == "max_facts"
    second = refresh(editor)  # a later run re-scores and takes what still fades
    assert second.faded == 2 + (not winning(editor.loaded, LATER[:1])[0])
    assert second.refreshed[-2:] == ["b2", "b3"] and second.stopped == "done"
    editor.close()


def test_refresh_refuses_what_it_cannot_do_exactly(tmp_path: Path) -> None:
    plain = Editor(tiny_model("llama", hidden=64, intermediate=128), **HP)
    with pytest.raises(SeqEditError, match="refresh re-edits the facts of a ledger"):
        refresh(plain)
    naive = _editor(tmp_path / "N", alignment="naive")
    with pytest.raises(SeqEditError, match="cannot replace a fact's constraint exactly"):
        refresh(naive)
    naive.close()
    editor = _editor(tmp_path / "L")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        refresh(editor, batch_size=0)
    with pytest.raises(ValueError, match="criterion must be one of"):
        refresh(editor, criterion="likely")
    editor.close()


def test_cli_refresh_re_edits_and_says_what_it_did(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from seqedit.cli import app
    from seqedit.models.load import load_model

    model = tmp_path / "model"
    lm = tiny_model("llama", hidden=64, intermediate=128)
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    editor = Editor(load_model(str(model)), ledger=tmp_path / "L", **HP)
    _faded_ledger(editor)
    editor.close()
    run = CliRunner().invoke(app, ["refresh", "-l", str(tmp_path / "L"), "--max-facts", "2", "--json"])
    assert run.exit_code == 0, run.output
    rep = json.loads(run.stdout)
    assert rep["faded"] == 3 and rep["refreshed"] == ["b1", "b2"] and rep["stopped"] == "max_facts"
    bad = CliRunner().invoke(app, ["refresh", "-l", str(tmp_path / "L"), "--criterion", "likely"])
    assert bad.exit_code != 0 and "--criterion must be one of most_probable, vs_true" in bad.output
    plain = CliRunner().invoke(app, ["refresh", "-l", str(tmp_path / "L"), "--batch-size", "1"])
    assert plain.exit_code == 0 and "1 of 6 facts in force had faded; re-edited 1 in 1 steps (done" in plain.stdout
