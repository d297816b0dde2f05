"""The ledger through the Editor on tiny models: layout, replace / forget / undo semantics, reopen,
refusals and every error path, float32 storage, memorize_latest, methods without exact removal,
export (HF directory and deltas), and the CLI commands."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from ledger_helpers import LAYERS, apply_facts, columns, committed_ledger, fact, make_editor, ote_gap
from typer.testing import CliRunner

import seqedit
from seqedit import Fact, Ledger, LedgerCorruptError, LedgerError, SeqEditError
from seqedit.datasets import load_facts
from seqedit.shared_data import counterfact_path
from seqedit.testing import tiny_model

# ------------------------------------------------------------------------------------------ layout


def test_layout_manifest_and_journal(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L")
    apply_facts(ed, [fact(0), fact(1)])
    apply_facts(ed, [fact(1, 1)])
    ed.close()
    names = sorted(str(p.relative_to(tmp_path / "L")) for p in (tmp_path / "L").rglob("*") if p.is_file())
    assert "ledger.sqlite" in names and "steps/step-000001.safetensors" in names
    assert {f"base/sigma0-L00{l}.safetensors" for l in LAYERS} <= set(names)
    db = sqlite3.connect(tmp_path / "L" / "ledger.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Ledger(tmp_path / "L") as L:
        man = L.manifest
        assert man["method_label"] == "memit/aligned" and man["base"]["name"] == "tiny-llama"
        assert man["hparams"]["layers"] == list(LAYERS) and man["kv_dtype"] == "float64"
        assert set(man["seeds"]) == {"template_seed", "stats_seed"}
        steps = L.steps()
        assert [(s.kind, s.added, s.removed) for s in steps] == [
            ("apply", ("f0-0", "f1-0"), ()), ("apply", ("f1-1",), ("f1-0",))]
        assert [r.fact.id for r in L.in_force()] == ["f0-0", "f1-1"]


def test_apply_with_real_values_replaces_a_slot_and_reports(tmp_path: Path) -> None:
    facts = load_facts(counterfact_path(), limit=2)
    ed = make_editor(tmp_path / "L")
    r1 = ed.apply(facts)
    assert r1.id == 1 and "commit" in r1.seconds and r1.removed == []
    assert set(r1.constraints) == set(LAYERS) and r1.constraints[1][0].shape == (64, 2)
    newer = Fact(prompt=facts[0].prompt + ".", subject=facts[0].subject.upper(), target="Tokyo", id="new")
    r2 = ed.apply([newer])  # same slot after normalisation: a replacement
    assert r2.id == 2 and r2.removed == [facts[0].id]
    assert [f.id for f in ed.facts_in_force()] == [facts[1].id, "new"]
    assert ed.verify().ok
    assert ed.ledger.step(2).info["report"]["removed"] == [facts[0].id]


# ---------------------------------------------------------------------------------------- reopening


def test_reopen_restores_weights_bitwise_and_continues(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L", snapshot_every=2)
    for s in range(5):
        apply_facts(ed, [fact(s)])
    ed.forget(["f2-0"])
    live = {l: ed.master[l].clone() for l in LAYERS}
    ed.close()
    lm = tiny_model("llama")
    ed2 = Editor_reopen = make_editor(tmp_path / "L", lm=lm)
    assert ed2.ledger.snapshot_steps() == [4, 6]  # the newest two are kept
    for l in LAYERS:
        assert torch.equal(ed2.master[l], live[l])
        assert torch.equal(lm.adapter.weight(l), live[l].to(lm.dtype))
    apply_facts(Editor_reopen, [fact(7)])
    assert ote_gap(ed2, ["f0-0", "f1-0", "f3-0", "f4-0", "f7-0"]) < 1e-9
    ed2.close()


def test_reopen_takes_method_and_hparams_from_the_ledger(tmp_path: Path) -> None:
    committed_ledger(tmp_path / "L", method="rlsedit")
    ed = seqedit.Editor(tiny_model("llama"), ledger=tmp_path / "L")
    assert ed.spec.label == "rlsedit/aligned" and ed.hparams.layers == LAYERS and ed.hparams.lam == 10.0
    ed.close()
    ed = make_editor(tmp_path / "L", method="rlsedit", v_steps=3)  # value-optimisation settings may change
    assert ed.hparams.v_steps == 3
    ed.close()


def test_a_ledger_written_before_the_method_registry_reopens(tmp_path: Path) -> None:
    """Older manifests stored every option of every method and the ridge as a hyperparameter."""
    ed = make_editor(tmp_path / "L", method="memit")
    apply_facts(ed, [fact(0), fact(1)])
    live = {l: ed.master[l].clone() for l in LAYERS}
    ed.close()
    db = sqlite3.connect(tmp_path / "L" / "ledger.sqlite")
    man = json.loads(db.execute("SELECT value FROM meta WHERE key = 'manifest'").fetchone()[0])
    man["method"] = {"name": "memit", "alignment": "aligned", "ridge": None, "mu2": 1.0, "threshold": 2e-2,
                     "alpha": 10.0, "top_percent": 20.0, "reproduce_official_prune": False}
    man["hparams"]["ridge"] = 0.0
    with db:  # as that older seqedit wrote it: format version 1, no content digest
        db.execute("UPDATE meta SET value = ? WHERE key = 'manifest'", (json.dumps(man),))
        db.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
        db.execute("DELETE FROM meta WHERE key = 'digest'")
    db.close()
    with make_editor(tmp_path / "L") as reopened:
        assert reopened.spec == seqedit.parse_method("memit", ridge=0.0)
        assert all(torch.equal(reopened.master[l], live[l]) for l in LAYERS)
        report = reopened.verify()
        assert report.ok and all(e["rel_error"] < 1e-10 for e in report.layers.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "alphaedit"}, r"edits with memit/aligned.*refusing to continue it with alphaedit/aligned"),
        ({"lam": 20.0}, r"other hyperparameters \(lam: ledger 10.0, given 20.0\)"),
        ({"lam_growth": 4}, r"other hyperparameters \(lam_growth: ledger 0, given 4\)"),
        ({"layers": (1, 3)}, r"other hyperparameters \(layers"),
        ({"alignment": "naive"}, r"edits with memit/aligned.*refusing to continue it with memit/naive"),
        ({"ridge": 0.5}, r"edits with memit/aligned.*refusing to continue it with memit/aligned \{.*'ridge': 0.5"),
    ],
)
def test_reopen_with_another_method_or_objective_is_refused(tmp_path: Path, kwargs, message) -> None:
    committed_ledger(tmp_path / "L")
    with pytest.raises(LedgerError, match=message):
        make_editor(tmp_path / "L", **kwargs)
    make_editor(tmp_path / "L").close()  # the refusal released the ledger


def test_reopen_on_another_base_model_is_refused(tmp_path: Path) -> None:
    committed_ledger(tmp_path / "L")
    with pytest.raises(LedgerError, match=r"built on base model 'tiny-llama'.*fingerprint.*load that base model"):
        make_editor(tmp_path / "L", lm=tiny_model("llama", seed=1))


def test_reopen_on_an_already_edited_model_object_is_refused(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    ed = make_editor(tmp_path / "L", lm=lm)
    apply_facts(ed, [fact(0)])
    ed.close()
    with pytest.raises(LedgerError, match="layer 1 of the model differs.*already edited"):
        make_editor(tmp_path / "L", lm=lm)


def test_a_new_ledger_on_an_already_edited_model_object_is_refused(tmp_path: Path) -> None:
    """The README's old example: a ledger started on a model the first editor had edited recorded the
    edited weights as W₀ under the base fingerprint, and could never be verified or reopened."""
    lm = tiny_model("llama")
    plain = seqedit.Editor(lm, layers=LAYERS, stats_tokens=2000, lam=10.0, v_steps=2)
    plain.apply([fact(0)])
    with pytest.raises(LedgerError, match="differ from those it was loaded with.*already edited"):
        make_editor(tmp_path / "L", lm=lm)
    assert not (tmp_path / "L").exists()  # nothing left behind


def test_second_writer_is_refused(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L")
    apply_facts(ed, [fact(0)])
    with pytest.raises(LedgerError, match="open for writing by another editor"):
        make_editor(tmp_path / "L")
    ed.close()
    with pytest.raises(SeqEditError, match="ledger was closed"):
        ed.forget(["x"])


def test_not_a_ledger_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="is not a seqedit ledger"):
        Ledger(tmp_path)
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        make_editor(tmp_path / "a", kv_dtype="float16")
    with pytest.raises(ValueError, match="snapshot_every must be an int"):
        make_editor(tmp_path / "b", snapshot_every=0)
    with pytest.raises(LedgerError, match="prune/naive prunes the total update once"):
        make_editor(tmp_path / "c", method="prune", alignment="naive")
    ed = seqedit.Editor(tiny_model("llama"), layers=LAYERS, stats_tokens=2000)
    for call in (lambda: ed.forget(["x"]), lambda: ed.undo(1), ed.verify, ed.facts_in_force):
        with pytest.raises(SeqEditError, match="needs a ledger"):
            call()


# ------------------------------------------------------------------------------------ corruption


def _ledger_with_steps(tmp_path: Path) -> Path:
    ed = make_editor(tmp_path / "L")
    apply_facts(ed, [fact(0)])
    apply_facts(ed, [fact(1)])
    ed.close()
    return tmp_path / "L"


def test_checksum_mismatch_is_reported_and_nothing_is_deleted(tmp_path: Path) -> None:
    path = _ledger_with_steps(tmp_path)
    f = path / "steps" / "step-000002.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LedgerCorruptError, match=r"step-000002.safetensors is corrupt \(sha256"):
        make_editor(path)
    assert f.read_bytes() == bytes(data)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    path = _ledger_with_steps(tmp_path)
    (path / "steps" / "step-000001.safetensors").unlink()
    with pytest.raises(LedgerCorruptError, match=r"committed files are missing: \['steps/step-000001"):
        make_editor(path)


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    path = _ledger_with_steps(tmp_path)
    db = sqlite3.connect(path / "ledger.sqlite")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    db.commit()
    db.close()
    with pytest.raises(LedgerCorruptError, match="format version '99'; this seqedit reads versions 1, 2"):
        Ledger(path)


def test_verify_reports_a_damaged_journal_page(tmp_path: Path) -> None:
    """Random bytes in the page of the meta table's key index, which no query reads: the journal answers every
    query, so only SQLite's integrity_check sees the damage (verify used to say OK)."""
    path = _ledger_with_steps(tmp_path)
    db = sqlite3.connect(path / "ledger.sqlite")
    page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_meta_1'").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(path / "ledger.sqlite", "r+b") as fh:
        fh.seek((page - 1) * size + 8)
        fh.write(bytes(range(7, 250, 3)))
    with make_editor(path) as ed:
        rep = ed.verify()
    assert not rep.ok
    assert any(name == "ledger.sqlite" and "integrity_check" in problem for name, problem in rep.bad_files)


def test_verify_reports_a_file_corrupted_while_open(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L")
    apply_facts(ed, [fact(0)])
    (tmp_path / "L" / "steps" / "step-000001.safetensors").write_bytes(b"garbage")
    rep = ed.verify()
    assert not rep.ok and rep.bad_files == [("steps/step-000001.safetensors", "checksum mismatch")]
    ed.close()


def test_interrupted_step_files_are_rolled_back_on_reopen(tmp_path: Path) -> None:
    path = _ledger_with_steps(tmp_path)
    (path / "steps" / "step-000003.safetensors").write_bytes(b"half a step")
    (path / "snapshots").mkdir(exist_ok=True)
    (path / "snapshots" / "snap-000003-L001.safetensors").write_bytes(b"x")
    (path / "steps" / ".step-000003.safetensors.abc.tmp").write_bytes(b"x")
    ed = make_editor(path)
    assert sorted(ed.ledger.recovered) == [
        "snapshots/snap-000003-L001.safetensors", "steps/.step-000003.safetensors.abc.tmp",
        "steps/step-000003.safetensors"]
    assert ed.ledger.last_step == 2 and ed.verify().ok
    ed.close()


def test_a_failing_commit_leaves_editor_and_ledger_unchanged(tmp_path: Path, monkeypatch) -> None:
    ed = make_editor(tmp_path / "L")
    apply_facts(ed, [fact(0)])
    before = {l: ed.master[l].clone() for l in LAYERS}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(seqedit.ledger.writer, "_commit_rows", boom)
    with pytest.raises(OSError, match="disk full"):
        apply_facts(ed, [fact(1)])
    with pytest.raises(OSError, match="disk full"):
        ed.forget(["f0-0"])
    monkeypatch.undo()
    assert all(torch.equal(ed.master[l], before[l]) for l in LAYERS)
    assert not (tmp_path / "L" / "steps" / "step-000002.safetensors").exists()
    assert ed.ledger.last_step == 1 and ed.verify().ok
    ed.close()


# ----------------------------------------------------------------------------------- semantics errors


def test_step_conflicts_and_bad_requests(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L")
    with pytest.raises(LedgerError, match=r"two facts for the same slot: 'a' \('Place 0'.*and 'b'"):
        apply_facts(ed, [fact(0).with_id("a"), Fact(prompt="{} is located in.", subject="place 0", target="X", id="b")])
    with pytest.raises(LedgerError, match="two facts with id 'f0-0'"):
        apply_facts(ed, [fact(0), fact(1).with_id("f0-0")])
    apply_facts(ed, [fact(0)])
    with pytest.raises(LedgerError, match="fact id 'f0-0' is already in force for another slot"):
        apply_facts(ed, [fact(1).with_id("f0-0")])
    with pytest.raises(ValueError, match="needs facts="):
        ed.apply_kv(*columns(["f1-0"], ed.w0))
    with pytest.raises(ValueError, match="apply_kv got 2 facts but key columns"):
        ed.apply_kv(*columns(["f1-0"], ed.w0), facts=[fact(1), fact(2)])
    with pytest.raises(LedgerError, match=r"not in force, cannot forget: \['nope'\]"):
        ed.forget(["f0-0", "nope"])
    with pytest.raises(LedgerError, match="forget needs at least one fact id"):
        ed.forget([])
    with pytest.raises(LedgerError, match=r"has no step 7 \(steps 1..1\)"):
        ed.undo(7)
    with pytest.raises(ValueError, match="undo needs a step id"):
        ed.undo("1")
    assert ed.ledger.last_step == 1 and ed.verify().ok
    ed.close()


def test_undo_semantics(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L")
    apply_facts(ed, [fact(0), fact(1)])  # 1
    apply_facts(ed, [fact(0, 1)])  # 2: replaces f0-0
    ed.forget(["f1-0"])  # 3
    assert [f.id for f in ed.facts_in_force()] == ["f0-1"]
    undo3 = ed.undo(3)  # 4: f1-0 back
    assert undo3.kind == "undo" and undo3.target == 3 and undo3.added == ("f1-0",)
    ed.undo(2)  # 5: f0-1 leaves, f0-0 back
    assert sorted(f.id for f in ed.facts_in_force()) == ["f0-0", "f1-0"]
    assert ote_gap(ed, ["f0-0", "f1-0"]) < 1e-9
    with pytest.raises(LedgerError, match="step 2 was already undone by step 5; undo step 5 to redo it"):
        ed.undo(2)
    ed.undo(5)  # 6: redo step 2
    assert sorted(f.id for f in ed.facts_in_force()) == ["f0-1", "f1-0"]
    ed.forget(["f1-0"])  # 7
    apply_facts(ed, [fact(1, 2)])  # 8: the slot is free again
    with pytest.raises(LedgerError, match=r"undo of step 7 would bring back 'f1-0'.*fact 'f1-2' \(added at step 8\)"):
        ed.undo(7)
    ed.undo(8)
    ed.undo(7)
    assert sorted(f.id for f in ed.facts_in_force()) == ["f0-1", "f1-0"] and ote_gap(ed, ["f0-1", "f1-0"]) < 1e-9
    ed.close()


# ------------------------------------------------------------------------------------ method variants


def test_memorize_latest_forgets_the_previous_batch(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L", method="memorize_latest")
    apply_facts(ed, [fact(0), fact(1)])
    rec = apply_facts(ed, [fact(2), fact(3)])
    assert rec.removed == ("f0-0", "f1-0")
    assert ote_gap(ed, ["f2-0", "f3-0"]) < 1e-9
    ed.forget(["f2-0"])
    assert ote_gap(ed, ["f3-0"]) < 1e-9
    ed.undo(2)  # back to the first batch
    assert sorted(f.id for f in ed.facts_in_force()) == ["f0-0", "f1-0"] and ote_gap(ed, ["f0-0", "f1-0"]) < 1e-9
    apply_facts(ed, [fact(4)])  # the state's own "previous batch" agrees with the ledger
    assert ote_gap(ed, ["f4-0"]) < 1e-9
    live = {l: ed.master[l].clone() for l in LAYERS}
    ed.close()
    ed = make_editor(tmp_path / "L")
    assert ed.spec.label == "memorize_latest/exact"
    assert all(torch.equal(ed.master[l], live[l]) for l in LAYERS) and ed.verify().ok
    ed.close()


@pytest.mark.parametrize(("method", "alignment"), [("memit", "naive"), ("rect", "aligned"), ("prune", "uncorrected")])
def test_methods_without_exact_removal(tmp_path: Path, method: str, alignment: str) -> None:
    ed = make_editor(tmp_path / "L", method=method, alignment=alignment)
    apply_facts(ed, [fact(0)])
    after1 = {l: ed.master[l].clone() for l in LAYERS}
    apply_facts(ed, [fact(1)])
    label = f"{method}/{alignment}"
    with pytest.raises(LedgerError, match=f"{label} has no exact removal.*forget is not supported"):
        ed.forget(["f0-0"])
    with pytest.raises(LedgerError, match=f"{label} has no exact removal.*replacing facts in force"):
        apply_facts(ed, [fact(0, 1)])
    with pytest.raises(LedgerError, match=r"undo of step 1 \(not the latest step, 2\)"):
        ed.undo(1)
    ed.undo(2)  # the latest step: its stored previous state
    assert all(torch.equal(ed.master[l], after1[l]) for l in LAYERS)
    rep = ed.verify()
    assert rep.ok and not rep.exact and rep.layers[1]["rel_error"] is None
    ed.close()
    ed = make_editor(tmp_path / "L")
    assert all(torch.equal(ed.master[l], after1[l]) for l in LAYERS)
    ed.close()


def test_float32_storage(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L", kv_dtype="float32")
    apply_facts(ed, [fact(0), fact(1)])
    apply_facts(ed, [fact(1, 1)])
    assert ed.last_record is not None and ed.verify(tol=1e-9).ok  # the stored float32 (k, v) are the truth
    assert 1e-9 < ote_gap(ed, ["f0-0", "f1-1"]) < 1e-5  # vs the float64 originals: float32 rounding
    live = {l: ed.master[l].clone() for l in LAYERS}
    ed.close()
    with Ledger(tmp_path / "L") as L:
        assert L.read("steps/step-000001.safetensors")["K.1"].dtype == torch.float32
    ed = make_editor(tmp_path / "L")
    assert all(torch.equal(ed.master[l], live[l]) for l in LAYERS)
    ed.close()


# -------------------------------------------------------------------------------------------- export


def _logits(model, tok) -> torch.Tensor:
    enc = tok(["Place 0 is located in", "The capital of France is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_export_full_and_delta(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    lm = tiny_model("llama")
    ed = make_editor(tmp_path / "L", lm=lm)
    apply_facts(ed, [fact(0), fact(1)])
    live = _logits(lm.model, lm.tokenizer)
    ed.export(tmp_path / "full")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full", attn_implementation="eager")
    params = dict(lm.model.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in reloaded.named_parameters())
    assert torch.equal(_logits(reloaded, lm.tokenizer), live)
    assert json.loads((tmp_path / "full" / "seqedit_ledger.json").read_text())["facts_in_force"] == ["f0-0", "f1-0"]
    with pytest.raises(LedgerError, match="exists and is not an empty directory"):
        ed.export(tmp_path / "full")

    ed.export(tmp_path / "delta", delta=True, delta_dtype="float64")
    assert sorted(p.name for p in (tmp_path / "delta").iterdir()) == ["apply_delta.py", "delta.safetensors", "seqedit_delta.json"]
    base = tiny_model("llama")
    seqedit.apply_delta(base, tmp_path / "delta")
    assert torch.equal(_logits(base.model, lm.tokenizer), live)
    with pytest.raises(LedgerError, match="were made for base 'tiny-llama'"):
        seqedit.apply_delta(tiny_model("llama", seed=3), tmp_path / "delta")
    with pytest.raises(ValueError, match="delta dtype must be float32 or float64"):
        ed.export(tmp_path / "d2", delta=True, delta_dtype="int8")
    ed.close()


def test_delta_loader_script_is_standalone(tmp_path: Path) -> None:
    import importlib.util

    lm = tiny_model("llama")
    ed = make_editor(tmp_path / "L", lm=lm)
    apply_facts(ed, [fact(0)])
    ed.export(tmp_path / "delta", delta=True)
    spec = importlib.util.spec_from_file_location("apply_delta", tmp_path / "delta" / "apply_delta.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = tiny_model("llama")
    mod.apply(base.model)
    assert torch.allclose(_logits(base.model, lm.tokenizer), _logits(lm.model, lm.tokenizer), atol=1e-5)
    ed.close()


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_ledger_commands(tmp_path: Path, monkeypatch) -> None:
    from seqedit import cli

    path = tmp_path / "L"
    ed = make_editor(path)
    apply_facts(ed, [fact(0), fact(1)])
    ed.close()
    from seqedit import editor as editor_mod

    monkeypatch.setattr(editor_mod, "load_model", lambda name, **kw: tiny_model("llama"))
    monkeypatch.setattr("seqedit.models.load.model_config", lambda name: (name, None))  # read before the load
    run = CliRunner().invoke

    r = run(cli.app, ["log", "--ledger", str(path), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [f["id"] for f in data["in_force"]] == ["f0-0", "f1-0"] and data["steps"][0]["kind"] == "apply"
    r = run(cli.app, ["log", "--ledger", str(path)])
    assert r.exit_code == 0 and "facts in force" in r.output

    r = run(cli.app, ["forget", "f0-0", "--ledger", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["removed"] == ["f0-0"]
    r = run(cli.app, ["undo", "2", "--ledger", str(path)])
    assert r.exit_code == 0 and "step 3 (undo of step 2)" in r.output
    r = run(cli.app, ["verify", "--ledger", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["ok"] is True
    r = run(cli.app, ["verify", "--ledger", str(path)])
    assert r.exit_code == 0 and "OK" in r.output
    r = run(cli.app, ["constraint-fit", "--ledger", str(path), "--json"])
    assert r.exit_code == 0, r.output
    (fit,) = json.loads(r.output)
    assert fit["n_facts"] == 2 and [g["facts"] for g in fit["layers"]["1"]["by_step"]] == [2]
    r = run(cli.app, ["constraint-fit", "--ledger", str(path), "--at-step", "9"])
    assert r.exit_code == 2 and "no step 9" in r.output
    r = run(cli.app, ["constraint-fit", "--ledger", str(path)])
    assert r.exit_code == 0 and "keys/d_in" in r.output and "2/64" in r.output
    r = run(cli.app, ["constraint-fit", "--ledger", str(path), "--key-drift", "--json"])
    assert r.exit_code == 0, r.output
    (drift,) = json.loads(r.output)
    assert drift["n_facts"] == 2 and {"unmet_now", "unmet_stored"} <= set(drift["layers"]["1"])
    r = run(cli.app, ["constraint-fit", "--ledger", str(path), "--key-drift"])
    assert r.exit_code == 0 and "key drift" in r.output
    r = run(cli.app, ["constraint-fit", "--ledger", str(path), "--key-drift", "--at-step", "1"])
    assert r.exit_code == 2 and "does not combine" in r.output
    r = run(cli.app, ["export", str(tmp_path / "out"), "--ledger", str(path), "--delta", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["delta"] is True

    r = run(cli.app, ["forget", "nope", "--ledger", str(path)])
    assert r.exit_code == 2 and "not in force" in " ".join(r.output.split())
    r = run(cli.app, ["log", "--ledger", str(tmp_path / "none")])
    assert r.exit_code == 2 and "seqedit ledger" in r.output
    (path / "steps" / "step-000001.safetensors").write_bytes(b"x")
    r = run(cli.app, ["verify", "--ledger", str(path)])  # a failed check (1), reported, not an error (2)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "steps/step-000001.safetensors" in r.output and "checksum mismatch" in r.output


def test_a_step_whose_columns_are_not_a_whole_number_per_fact_is_refused(tmp_path) -> None:
    ed = make_editor(tmp_path / "L")
    ed.prepare()
    K, V = columns(["a", "b", "c"], ed.w0)
    with pytest.raises(LedgerError, match="whole number of key columns per fact"):
        ed.ledger.commit("apply", add=[fact(1), fact(2)], kv={l: (K[l], V[l]) for l in LAYERS})
    assert ed.ledger.last_step == 0 and not list((tmp_path / "L" / "steps").glob("*"))
    ed.close()


def test_a_recorded_kv_width_that_makes_no_sense_is_corruption(tmp_path) -> None:
    ed = make_editor(tmp_path / "L")
    apply_facts(ed, [fact(1), fact(2)])
    ed.ledger.annotate(1, {"kv_width": 3})  # the file holds 2 columns: one per fact
    with pytest.raises(LedgerCorruptError, match="past the end of step 1"):
        ed.ledger.kv(ed.ledger.in_force(), LAYERS)
    ed.ledger.annotate(1, {"kv_width": "two"})
    with pytest.raises(LedgerCorruptError, match="kv_width='two'"):
        ed.ledger.kv(ed.ledger.in_force(), LAYERS)
    ed.close()


def test_constraint_fit_sees_a_full_layer_and_no_forgetting(tmp_path) -> None:
    """Below the key dimension (64) and with λ ≈ 0 every constraint is met, old or new; with more facts
    than key dimensions none can be, and the unmet share is the same for early and late facts (aligned
    steps are the one-time solution: nothing is forgotten by age)."""
    ed = make_editor(tmp_path / "few", lam=1e-9)
    for s in range(3):
        apply_facts(ed, [fact(10 * s + i) for i in range(10)])
    rep = ed.constraint_fit(groups=3)
    for e in rep.layers.values():
        assert e["columns"] == 30 and e["d_in"] == 64 and e["median"] < 1e-5
    ed.close()
    ed = make_editor(tmp_path / "many", lam=1e-9)
    for s in range(6):
        apply_facts(ed, [fact(100 + 20 * s + i) for i in range(20)])
    rep = ed.constraint_fit(groups=2)
    assert rep.n_facts == 120 and rep.steps == 6
    # after step 3 (60 facts, under 64 key dimensions) the weights of that moment met them all
    then = ed.constraint_fit(at_step=3)
    assert then.n_facts == 60 and then.steps == 3 and all(e["median"] < 1e-4 for e in then.layers.values())
    ed.forget(["f100-0"])
    assert ed.constraint_fit(at_step=6).n_facts == 120 and ed.constraint_fit().n_facts == 119
    for e in rep.layers.values():
        early, late = (g["median"] for g in e["by_step"])
        assert [g["steps"] for g in e["by_step"]] == [[1, 3], [4, 6]] and [g["facts"] for g in e["by_step"]] == [60, 60]
        assert e["median"] > 0.2 and abs(early - late) < 0.5 * e["median"]
    ed.close()


def test_constraint_fit_in_the_past_needs_an_exact_form(tmp_path) -> None:
    ed = make_editor(tmp_path / "L", alignment="naive")
    apply_facts(ed, [fact(1)])
    apply_facts(ed, [fact(2)])
    assert ed.constraint_fit().n_facts == 2  # the live weights can always be measured
    with pytest.raises(LedgerError, match="cannot be re-solved"):
        ed.constraint_fit(at_step=1)
    ed.close()


def test_key_drift_moves_only_keys_read_below_a_later_edit(tmp_path) -> None:
    """A key at layer ℓ depends on the layers below ℓ only. The lowest edited layer's keys therefore
    never move; an old fact's key at an upper layer moves when a later step edits a layer below it;
    the last step's facts were read on the final lower layers, so their keys do not move."""
    ed = make_editor(tmp_path / "L")
    ed.apply([fact(1), fact(2)])
    ed.apply([fact(3), fact(4)])
    rep = ed.key_drift(groups=2)
    assert rep.n_facts == 4 and rep.steps == 2
    low, high = rep.layers[LAYERS[0]], rep.layers[LAYERS[1]]
    assert low["columns"] == high["columns"] == 4 and [g["facts"] for g in high["by_step"]] == [2, 2]
    assert all(g["median"] < 1e-5 for g in low["by_step"])
    first, last = high["by_step"]
    assert last["median"] < 1e-5 and first["median"] > 1e-3
    # where the keys did not move, the fit with the keys read now is the stored fit
    assert low["unmet_now"] == pytest.approx(low["unmet_stored"], rel=1e-3)
    assert last["unmet_now"] == pytest.approx(last["unmet_stored"], rel=1e-3)
    ed.close()
