"""Writing a ledger: a step's tensor files, then ONE journal transaction recording the step, its facts and
the files' sha256, sealed by the step's hash-chain link (:mod:`~seqedit.ledger.chain`).

Tensor files are written under their final names (temp → fsync → rename → fsync dir) before the SQLite
commit, which is the commit point: files no committed row names are leftovers ``Ledger`` removes on
reopen. Snapshot files a step supersedes are deleted only once its transaction is committed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

from ..atomic import atomic_write
from ..facts import Fact
from . import chain, tensorio
from .journal import Journal, LedgerError
from .records import FactRow, kv_width_of, sigma_name, snap_name, step_info, step_name


class Ledger(Protocol):  # what writing needs of ``store.Ledger`` (which calls in here, not the reverse)
    path: Path
    journal: Journal

    @property
    def last_step(self) -> int: ...

    def snapshot_steps(self) -> list[int]: ...

__all__ = ["KEEP_SNAPSHOTS", "annotate", "commit", "store_sigma0", "write_file"]

KEEP_SNAPSHOTS = 2  # the newest two: the one before the latest step serves undo of non-exact methods
Written = list[tuple[str, str, int, int | None]]  # files rows: (name, sha256, bytes, step)


def write_file(ledger: Ledger, name: str, obj: Any, step: int | None, written: Written) -> None:
    data = tensorio.encode(obj)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(ledger.path / name, write)
    written.append((name, tensorio.sha256(data), len(data), step))


def _unlink(ledger: Ledger, names: Sequence[str]) -> None:
    for name in names:
        try:
            (ledger.path / name).unlink()
        except OSError:
            pass


def commit(ledger: Ledger, kind: str, *, add: Sequence[Fact] = (), kv: dict[int, tuple[Tensor, Tensor]] | None = None,
           readd: Sequence[FactRow] = (), remove: Sequence[FactRow] = (), target: int | None = None,
           info: dict | None = None, snapshot: dict[int, dict] | None = None, targets: Tensor | None = None) -> int:
    """Record one step atomically (see :meth:`Ledger.commit`); returns its id."""
    step = ledger.last_step + 1
    written: Written = []
    if add:
        assert kv is not None
        width = kv_width_of(kv, len(add))
        if width != 1:
            info = {**(info or {}), "kv_width": width}
    try:
        if add:
            tensors = {f"{w}.{l}": t.contiguous() for l, (K, V) in kv.items() for w, t in (("K", K), ("V", V))}
            if targets is not None:
                if targets.shape[1] != width * len(add):
                    raise LedgerError(f"a step of {len(add)} facts with {width} key columns each got "
                                      f"{targets.shape[1]} target columns")
                tensors["Z"] = targets.contiguous()
            write_file(ledger, step_name(step), tensors, step, written)
        if snapshot is not None:
            for l, s in snapshot.items():
                write_file(ledger, snap_name(step, l), s, step, written)
        _commit_rows(ledger, step, kind, add, readd, remove, target, info or {}, snapshot is not None, written)
    except BaseException:
        _unlink(ledger, [name for name, *_ in written])  # never committed: these files belong to no step
        raise
    return step


def _commit_rows(ledger: Ledger, step: int, kind: str, add: Sequence[Fact], readd: Sequence[FactRow],
                 remove: Sequence[FactRow], target: int | None, info: dict, snap: bool, written: Written) -> None:
    c = ledger.journal
    with c.tx():
        c.run(
            "INSERT INTO steps (id, kind, created, target, snapshot, info) VALUES (?, ?, ?, ?, ?, ?)",
            (step, kind, time.time(), target, int(snap), json.dumps(info, default=str)),
        )
        for r in remove:
            if c.run("UPDATE facts SET removed = ? WHERE row = ? AND removed IS NULL", (step, r.row)) != 1:
                raise LedgerError(f"fact {r.fact.id!r} (row {r.row}) is not in force")
        new = [(f, step, i) for i, f in enumerate(add)] + [(r.fact, r.kv_step, r.kv_col) for r in readd]
        try:
            c.many(
                "INSERT INTO facts (fact_id, slot_subject, slot_prompt, fact, kv_step, kv_col, added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(f.id, *f.slot, json.dumps(f.to_dict()), ks, kc, step) for f, ks, kc in new],
            )
        except sqlite3.IntegrityError as e:  # planning checks this first; the index is the backstop
            raise LedgerError(f"step {step} would put two facts with one slot or id in force: {e}") from None
        if target is not None:
            c.run("UPDATE steps SET undone_by = ? WHERE id = ?", (step, target))
        c.many("INSERT INTO files VALUES (?, ?, ?, ?)", written)
        dropped: list[str] = []
        if snap:
            old = [s for s in ledger.snapshot_steps() if s != step][: -(KEEP_SNAPSHOTS - 1) or None]
            for s in old:
                names = [r[0] for r in c.rows("SELECT name FROM files WHERE step = ? AND name LIKE 'snapshots/%'", (s,))]
                c.many("DELETE FROM files WHERE name = ?", [(n,) for n in names])
                c.run("UPDATE steps SET snapshot = 0 WHERE id = ?", (s,))
                dropped += names
        chain.seal_step(c, step)
        # superseded snapshots go once the step is committed; a crash first leaves files reopen removes
        c.after_commit(lambda: _unlink(ledger, dropped))


def annotate(ledger: Ledger, step: int, extra: dict) -> None:
    """Merge ``extra`` into the newest step's info and reseal its link."""
    if step != ledger.last_step:
        raise LedgerError(f"only the newest step ({ledger.last_step}) can be annotated, not step {step}")
    c = ledger.journal
    info = {**step_info(c.one("SELECT id, info FROM steps WHERE id = ?", (step,))), **extra}
    with c.tx():
        c.run("UPDATE steps SET info = ? WHERE id = ?", (json.dumps(info, default=str), step))
        chain.seal_step(c, step)


def store_sigma0(ledger: Ledger, sigma0: dict[int, Tensor]) -> None:
    written: Written = []
    for l, s in sigma0.items():
        write_file(ledger, sigma_name(l), {"sigma0": s.to(torch.float64)}, None, written)
    with ledger.journal.tx():
        ledger.journal.many("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", written)
