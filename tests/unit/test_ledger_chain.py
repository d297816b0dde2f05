"""The journal's hash chain and O(step) bookkeeping: verify names the step whose rows were changed,
planning reads only the rows a step touches, an apply step is one journal transaction, and ledgers of
format 2 (one digest of every row) still open and are upgraded on their first write."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from ledger_helpers import LAYERS, apply_facts, fact, make_editor, ote_gap

import seqedit.ledger.writer
from seqedit import Ledger, LedgerCorruptError, LedgerError
from seqedit.datasets import load_facts
from seqedit.ledger import chain
from seqedit.ledger.directory import check_writable
from seqedit.shared_data import counterfact_path


def _ledger(path: Path, steps: int = 4) -> Path:
    """Steps 1..``steps``: two new facts each, step 3 also replacing f0 (so it removes a row)."""
    ed = make_editor(path, snapshot_every=2)
    for s in range(1, steps + 1):
        apply_facts(ed, [fact(2 * s), fact(2 * s + 1)] + ([fact(2, 1)] if s == 3 else []))
    ed.close()
    return path


def _sql(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path / "ledger.sqlite")
    with db:
        for st in statements:
            db.execute(st)
    db.close()


def _problems(path: Path) -> list[str]:
    with Ledger(path) as L:
        return [p for name, p in L.check_files() if name == "ledger.sqlite"]


@pytest.mark.parametrize(
    ("step", "statement"),
    [
        (2, "UPDATE facts SET fact = replace(fact, 'Town 4-0', 'Town 9-9') WHERE added = 2"),
        (3, "UPDATE steps SET info = replace(info, 'update_norms', 'update_normz') WHERE id = 3"),
        (3, "UPDATE facts SET removed = 4 WHERE removed = 3"),  # a replaced fact said to leave later
        (1, "UPDATE facts SET kv_col = kv_col + 1 WHERE added = 1 AND kv_col = 0"),
        (2, "UPDATE files SET sha256 = replace(sha256, substr(sha256, 1, 1), 'x') WHERE name = 'steps/step-000002.safetensors'"),
        (4, "UPDATE steps SET created = created + 1 WHERE id = 4"),
    ],
)
def test_verify_names_the_step_whose_rows_were_changed(tmp_path: Path, step: int, statement: str) -> None:
    path = _ledger(tmp_path / "L")
    assert _problems(path) == []
    _sql(path, statement)
    problems = _problems(path)
    assert len(problems) == 1 and f"the hash chain breaks at step {step} " in problems[0], problems
    assert "content digest does not match" in problems[0]


def test_verify_sees_rows_outside_every_step(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "L")
    cases = {
        "UPDATE steps SET undone_by = 99 WHERE id = 1": "names undone_by step 99, which does not exist",
        "UPDATE steps SET snapshot = 1 WHERE id = 1": "snapshot rows were changed",
        "UPDATE meta SET value = replace(value, 'float64', 'float32') WHERE key = 'manifest'": "manifest",
        "UPDATE steps SET link = replace(link, substr(link, 1, 1), 'x') WHERE id = 4": "breaks at step 4",
        "DELETE FROM steps WHERE id = 2": "not numbered 1..3",
    }
    for statement, words in cases.items():
        copy = Path(shutil.copytree(path, tmp_path / f"c{len(list(tmp_path.iterdir()))}"))
        _sql(copy, statement)
        problems = _problems(copy)
        assert len(problems) == 1 and words in problems[0], (statement, problems)


def test_a_writer_checks_the_newest_link_and_the_cli_the_whole_chain(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "L")
    newest = Path(shutil.copytree(path, tmp_path / "newest"))
    _sql(newest, "UPDATE facts SET fact = replace(fact, 'Town 8-0', 'Town 9-9') WHERE added = 4")
    with pytest.raises(LedgerCorruptError, match="hash chain breaks at step 4.*run seqedit verify"):
        make_editor(newest)
    oldest = Path(shutil.copytree(path, tmp_path / "oldest"))
    _sql(oldest, "UPDATE facts SET fact = replace(fact, 'Town 2-0', 'Town 9-9') WHERE added = 1")
    with pytest.raises(LedgerCorruptError, match="hash chain breaks at step 1"):
        check_writable(oldest)  # what every CLI command that writes checks before loading a model


def test_a_damaged_step_keeps_its_link_broken_after_later_steps(tmp_path: Path) -> None:
    """Later commits link onto the stored link: they neither repair nor hide an earlier break."""
    path = _ledger(tmp_path / "L", steps=2)
    _sql(path, "UPDATE facts SET fact = replace(fact, 'Town 2-0', 'Town 9-9') WHERE added = 1")
    with make_editor(path) as ed:  # the library's open checks the newest step only
        apply_facts(ed, [fact(20)])
        assert "breaks at step 1 " in ed.verify().problems()[0][1]


def test_planning_reads_only_the_rows_a_step_touches(tmp_path: Path, monkeypatch) -> None:
    ed = make_editor(tmp_path / "L")
    apply_facts(ed, [fact(s) for s in range(30)])

    def whole_table(self):
        raise AssertionError("a step read every fact in force")

    monkeypatch.setattr(Ledger, "in_force", whole_table)
    statements: list[str] = []
    ed.ledger.journal.conn.set_trace_callback(statements.append)
    rec = apply_facts(ed, [fact(3, 1), fact(40)])  # one replacement, one new slot
    ed.forget(["f5-0"])
    ed.ledger.journal.conn.set_trace_callback(None)
    assert rec.removed == ("f3-0",) and rec.added == ("f3-1", "f40-0")
    assert not [s for s in statements if "FROM facts" in s and "WHERE" not in s]
    monkeypatch.undo()
    assert ote_gap(ed, [f"f{s}-0" for s in range(30) if s not in (3, 5)] + ["f3-1", "f40-0"]) < 1e-9
    ed.close()


def _vm_steps(ed, facts) -> int:
    """SQLite virtual-machine instructions (in tens) an ``apply_kv`` step of ``facts`` runs."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    ed.ledger.journal.conn.set_progress_handler(tick, 10)
    apply_facts(ed, facts)
    ed.ledger.journal.conn.set_progress_handler(None, 10)
    return count[0]


def test_a_steps_journal_work_does_not_grow_with_the_facts_in_force(tmp_path: Path) -> None:
    """The same step (ten new facts, one replacing a fact in force) on 60 and on 2,060 facts in force
    runs about as many SQLite instructions: no query visits the facts in force (an IN list of ids once
    went through the index of ``removed``, i.e. every row in force)."""
    ed = make_editor(tmp_path / "L", snapshot_every=1000)
    apply_facts(ed, [fact(s) for s in range(60)])
    small = _vm_steps(ed, [fact(s, 1) for s in range(1000, 1009)] + [fact(7, 1)])
    apply_facts(ed, [fact(s) for s in range(2000, 4000)])
    large = _vm_steps(ed, [fact(s, 1) for s in range(5000, 5009)] + [fact(8, 1)])
    assert 0 < small and large <= 1.5 * small, (small, large)
    ed.close()


def test_an_apply_step_is_one_journal_transaction(tmp_path: Path) -> None:
    facts = load_facts(counterfact_path(), limit=2)
    ed = make_editor(tmp_path / "L")
    ed.apply(facts[:1])  # the first step also stores Σ₀
    statements: list[str] = []
    ed.ledger.journal.conn.set_trace_callback(statements.append)
    report = ed.apply(facts[1:])
    ed.ledger.journal.conn.set_trace_callback(None)
    assert [s for s in statements if s.startswith(("BEGIN", "COMMIT"))] == ["BEGIN IMMEDIATE", "COMMIT"]
    assert ed.ledger.step(2).info["report"]["id"] == report.id == 2
    assert _problems(tmp_path / "L") == [] and ed.verify().ok
    ed.close()


def test_a_failure_after_the_commit_keeps_the_committed_step(tmp_path: Path, monkeypatch) -> None:
    """The step's rows are released inside the held transaction; an error before it ends (here, in the
    annotation) commits them all the same, since the bank already holds the step."""
    facts = load_facts(counterfact_path(), limit=1)
    ed = make_editor(tmp_path / "L")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(seqedit.ledger.writer, "annotate", boom)
    with pytest.raises(OSError, match="disk full"):
        ed.apply(facts)
    monkeypatch.undo()
    assert ed.ledger.last_step == 1 and "report" not in ed.ledger.step(1).info
    live = {l: ed.master[l].clone() for l in LAYERS}
    assert ed.verify().ok
    ed.close()
    with make_editor(tmp_path / "L") as again:
        assert all(torch.equal(again.master[l], live[l]) for l in LAYERS)


# ------------------------------------------------------------------------------------------ format 2
# The journal of format 2 exactly as seqedit 2f6f148 (the last to write it) created it, and its digest.
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    target INTEGER,
    undone_by INTEGER,
    snapshot INTEGER NOT NULL DEFAULT 0,
    info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS facts (
    row INTEGER PRIMARY KEY,
    fact_id TEXT NOT NULL,
    slot_subject TEXT NOT NULL,
    slot_prompt TEXT NOT NULL,
    fact TEXT NOT NULL,
    kv_step INTEGER NOT NULL,
    kv_col INTEGER NOT NULL,
    added INTEGER NOT NULL,
    removed INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS facts_slot_in_force ON facts(slot_subject, slot_prompt) WHERE removed IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS facts_id_in_force ON facts(fact_id) WHERE removed IS NULL;
CREATE INDEX IF NOT EXISTS facts_added ON facts(added);
CREATE INDEX IF NOT EXISTS facts_removed ON facts(removed);
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    step INTEGER
);
"""


def _digest_v2(db: sqlite3.Connection) -> str:
    h = hashlib.sha256()
    for table in ("meta", "steps", "facts", "files"):
        rows = sorted(json.dumps([table, *r]) for r in db.execute(f"SELECT * FROM {table}"))
        for line in rows:
            if not line.startswith('["meta", "digest",'):
                h.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def as_format_2(path: Path) -> None:
    """Rewrite ``path``'s journal as format 2: the same rows in the old schema, the old digest."""
    src = sqlite3.connect(path / "ledger.sqlite")
    tables = {t: src.execute(f"SELECT * FROM {t}").fetchall() for t in ("meta", "steps", "facts", "files")}
    src.close()
    (path / "ledger.sqlite").unlink()
    db = sqlite3.connect(path / "ledger.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    with db:
        db.executescript(_SCHEMA_V2)
        db.executemany("INSERT INTO meta VALUES (?, ?)",
                       [r for r in tables["meta"] if r[0] not in ("chain_head", "chain_rest", "format_version")])
        db.execute("INSERT INTO meta VALUES ('format_version', '2')")
        db.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?)", [r[:7] for r in tables["steps"]])
        db.executemany("INSERT INTO facts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", tables["facts"])
        db.executemany("INSERT INTO files VALUES (?, ?, ?, ?)", tables["files"])
        db.execute("INSERT INTO meta VALUES ('digest', ?)", (_digest_v2(db),))
    db.close()


def test_a_format_2_ledger_opens_and_is_upgraded_on_its_first_write(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "L", steps=3)
    with make_editor(path) as ed:
        live = {l: ed.master[l].clone() for l in LAYERS}
    as_format_2(path)
    with Ledger(path) as L:  # read-only: the old digest is checked, nothing is written
        assert L.journal.meta()["format_version"] == "2" and L.check_files() == []
        assert [s.id for s in L.steps()] == [1, 2, 3]
    damaged = Path(shutil.copytree(path, tmp_path / "damaged"))
    _sql(damaged, "UPDATE facts SET fact = replace(fact, 'Town 2-0', 'Town 9-9')")
    with pytest.raises(LedgerCorruptError, match="content digest does not match"):
        make_editor(damaged)
    with make_editor(path) as ed:
        assert all(torch.equal(ed.master[l], live[l]) for l in LAYERS)
        assert ed.ledger.journal.meta()["format_version"] == "2"  # opening writes nothing
        apply_facts(ed, [fact(30)])
        meta = ed.ledger.journal.meta()
        assert meta["format_version"] == "3" and "digest" not in meta
        links = [r[0] for r in ed.ledger.journal.rows("SELECT link FROM steps ORDER BY id")]
        assert len(links) == 4 and all(links) and meta[chain.HEAD_KEY] == links[-1]
        assert ed.verify().ok
    assert _problems(path) == []
    _sql(path, "UPDATE facts SET fact = replace(fact, 'Town 2-0', 'Town 9-9') WHERE added = 1")
    assert "breaks at step 1 " in _problems(path)[0]


def test_a_held_transaction_that_cannot_commit_closes_the_ledger(tmp_path: Path, monkeypatch) -> None:
    """If the one commit of a step fails after its parts were released, the journal lost a step the bank
    holds: the ledger closes, so the editor refuses to journal anything on top of it."""
    facts = load_facts(counterfact_path(), limit=2)
    ed = make_editor(tmp_path / "L")
    ed.apply(facts[:1])

    def full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(chain, "seal_rest", full)
    with pytest.raises(OSError, match="disk full"):
        ed.apply(facts[1:])
    monkeypatch.undo()
    assert ed.ledger.closed
    with pytest.raises(LedgerError, match="ledger was closed"):
        ed.facts_in_force()
    with make_editor(tmp_path / "L") as again:  # the journal holds step 1 only, and it is sound
        assert again.ledger.last_step == 1 and again.verify().ok
