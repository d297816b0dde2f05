"""The ledger directory: an SQLite journal (manifest, steps, facts, file checksums) and tensor files.

Layout of ``DIR/``::

    ledger.sqlite                       WAL journal, synchronous=FULL (tables meta, steps, facts, files)
    lock                                flock'ed by the one process that may write
    base/sigma0-L006.safetensors        Σ₀ of each edited layer (float64), written once
    steps/step-000001.safetensors       per-layer K.{ℓ}: [d_in, n], V.{ℓ}: [d_out, n] of the facts a step added,
                                        and Z: [d_z, n], their z-layer targets (steps that optimised values)
    snapshots/snap-000010-L006.safetensors   method state + float64 weight of a layer after a step

Commit protocol: tensor files are written under their final names (temp → fsync → rename → fsync dir),
then ONE SQLite transaction records the step, its facts and the files' sha256. The SQLite commit is the
commit point: on reopen, files that no committed row names are leftovers of an interrupted step (or of
snapshot clean-up) and are removed; a committed row whose file is missing or has another checksum is
corruption, reported and never repaired by deleting anything.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import fcntl
import torch
from torch import Tensor

from ..atomic import atomic_write
from ..facts import Fact
from . import tensorio
from .journal import (
    DB_NAME, FORMAT_VERSION, LOCK_NAME, READABLE_VERSIONS, Journal, LedgerCorruptError, LedgerError,
)

__all__ = ["FORMAT_VERSION", "FactRow", "Ledger", "LedgerCorruptError", "LedgerError", "StepRecord"]

KEEP_SNAPSHOTS = 2  # the newest two: the one before the latest step serves undo of non-exact methods
# What a manifest must hold for the ledger to be reopened (a damaged one fails here, not later).
_MANIFEST_KEYS = {"base": dict, "method": dict, "method_label": str, "hparams": dict, "kv_dtype": str,
                  "snapshot_every": int}

_STEP_FILE = re.compile(r"^step-(\d+)\.safetensors$")
_SNAP_FILE = re.compile(r"^snap-(\d+)-L(\d+)\.safetensors$")


@dataclass(frozen=True)
class FactRow:
    """One fact's life in force: added at step ``added``, removed at ``removed`` (``None``: in force).

    Its per-layer (k, v) are columns ``kv_col·w … kv_col·w + w − 1`` of step ``kv_step``'s file, where
    w is that step's ``kv_width`` (key columns per fact, 1 unless recorded in the step's info); an undo
    that brings a fact back makes a new row pointing at the same columns.
    """

    row: int
    fact: Fact
    kv_step: int
    kv_col: int
    added: int
    removed: int | None


@dataclass(frozen=True)
class StepRecord:
    """A committed step: ``kind`` is ``apply``, ``forget``, ``undo`` (of ``target``) or ``rekey`` (every fact
    in force re-added with keys read anew, ``docs/ledger.md``)."""

    id: int
    kind: str
    created: float
    target: int | None
    undone_by: int | None
    added: tuple[str, ...]
    removed: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "created": self.created, "target": self.target,
            "undone_by": self.undone_by, "added": list(self.added), "removed": list(self.removed),
            "info": self.info,
        }


def _fact_row(r: sqlite3.Row) -> FactRow:
    try:
        fact = Fact.from_dict(json.loads(r["fact"]))
    except (ValueError, TypeError) as e:  # FactError is a ValueError
        raise LedgerCorruptError(f"the journal's fact row {r['row']} is damaged: {e}") from None
    return FactRow(r["row"], fact, r["kv_step"], r["kv_col"], r["added"], r["removed"])


def _info(r: sqlite3.Row) -> dict[str, Any]:
    try:
        info = json.loads(r["info"])
    except (ValueError, TypeError):
        info = None
    if not isinstance(info, dict):
        raise LedgerCorruptError(f"the journal's row of step {r['id']} is damaged (its info is not a JSON object)")
    return info


class Ledger:
    """A ledger directory (see the module docstring). ``Ledger(path)`` opens an existing one read-only
    (journal queries: ``manifest``, ``steps()``, ``in_force()``; nothing is written, not even SQLite's
    shared-memory file when no writer is active); the :class:`~seqedit.Editor` opens it for writing
    with ``Ledger.open_for_writing``. Use ``close()`` (or ``with``) to release it.
    """

    def __init__(self, path: str | os.PathLike, *, _write: bool = False, _create: dict | None = None) -> None:
        self.path = Path(path)
        self.recovered: list[str] = []  # files of interrupted steps removed by this open
        self._lock_fd: int | None = None
        self.journal: Journal | None = None
        db = self.path / DB_NAME
        if _create is None and not db.is_file():
            raise LedgerError(f"{self.path} is not a seqedit ledger (no {DB_NAME})")
        try:
            if _write:
                self.path.mkdir(parents=True, exist_ok=True)
                self._lock()
            self.journal = Journal(self.path, read_only=not _write)
            if _create is not None:
                self.journal.create(_create)
            self.manifest = self._read_manifest()
            if _write:
                if problem := self.journal.digest_problem():  # before _recover may delete a file
                    raise LedgerCorruptError(f"ledger {self.path}: {problem}; run seqedit verify")
                self._recover()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ open / close
    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return (Path(path) / DB_NAME).is_file()

    @classmethod
    def open_for_writing(cls, path: str | os.PathLike, manifest: dict | None = None) -> Ledger:
        """Open ``path`` exclusively, creating it with ``manifest`` if it holds no ledger yet."""
        return cls(path, _write=True, _create=None if cls.exists(path) else manifest)

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LedgerError(
                f"ledger {self.path} is open for writing by another editor (close it first)"
            ) from None
        self._lock_fd = fd

    @property
    def closed(self) -> bool:
        return self.journal is None

    def close(self) -> None:
        journal = getattr(self, "journal", None)
        if journal is not None:
            journal.close()
            self.journal = None
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def _read_manifest(self) -> dict:
        rows = self.journal.meta()
        version = rows.get("format_version")
        if version not in READABLE_VERSIONS:
            raise LedgerCorruptError(
                f"ledger {self.path} has format version {version!r}; this seqedit reads versions "
                f"{', '.join(READABLE_VERSIONS)}"
            )
        try:
            man = json.loads(rows["manifest"])
        except (KeyError, ValueError):
            raise LedgerCorruptError(f"ledger {self.path}: the manifest is missing or not JSON") from None
        bad = [k for k, kind in _MANIFEST_KEYS.items() if not isinstance(man.get(k) if isinstance(man, dict) else None, kind)]
        if bad or not all(isinstance(man["base"].get(k), str) for k in ("name", "fingerprint")):
            raise LedgerCorruptError(f"ledger {self.path}: the manifest is damaged (bad or missing {bad or 'base'})")
        return man

    def _recover(self) -> None:
        """Finish or roll back an interrupted step: remove unreferenced files, check referenced ones exist."""
        known = {r["name"] for r in self.journal.rows("SELECT name FROM files")}
        last = self.last_step
        for sub in ("base", "steps", "snapshots"):
            d = self.path / sub
            if not d.is_dir():
                continue
            for p in d.iterdir():
                name = f"{sub}/{p.name}"
                if name in known:
                    continue
                m = _STEP_FILE.match(p.name) or _SNAP_FILE.match(p.name)
                interrupted = p.name.startswith(".") and p.name.endswith(".tmp")  # atomic_write temp
                interrupted |= bool(m) and (int(m.group(1)) > last or sub == "snapshots")
                interrupted |= sub == "base" and p.name.startswith("sigma0-")
                if interrupted:
                    p.unlink()
                    self.recovered.append(name)
        missing = [n for n in known if not (self.path / n).is_file()]
        if missing:
            raise LedgerCorruptError(f"ledger {self.path}: committed files are missing: {sorted(missing)}")

    # ------------------------------------------------------------------ queries
    @property
    def last_step(self) -> int:
        return self.journal.one("SELECT COALESCE(MAX(id), 0) FROM steps")[0]

    def count_steps(self, kind: str) -> int:
        """How many committed steps are of ``kind``."""
        return self.journal.one("SELECT COUNT(*) FROM steps WHERE kind = ?", (kind,))[0]

    def _ids(self, sql: str, step: int) -> tuple[str, ...]:
        return tuple(r[0] for r in self.journal.rows(sql, (step,)))

    def _record(self, r: sqlite3.Row) -> StepRecord:
        return StepRecord(
            r["id"], r["kind"], r["created"], r["target"], r["undone_by"],
            self._ids("SELECT fact_id FROM facts WHERE added = ? ORDER BY row", r["id"]),
            self._ids("SELECT fact_id FROM facts WHERE removed = ? ORDER BY row", r["id"]),
            _info(r),
        )

    def steps(self) -> list[StepRecord]:
        return [self._record(r) for r in self.journal.rows("SELECT * FROM steps ORDER BY id")]

    def step(self, step_id: int) -> StepRecord:
        r = self.journal.one("SELECT * FROM steps WHERE id = ?", (step_id,))
        if r is None:
            raise LedgerError(f"ledger {self.path} has no step {step_id} (steps 1..{self.last_step})")
        return self._record(r)

    def in_force(self) -> list[FactRow]:
        """Facts in force, in the order they were (re-)added."""
        return [_fact_row(r) for r in self.journal.rows("SELECT * FROM facts WHERE removed IS NULL ORDER BY row")]

    def in_force_after(self, step: int) -> list[FactRow]:
        """Facts that were in force right after ``step``."""
        sql = "SELECT * FROM facts WHERE added <= ? AND (removed IS NULL OR removed > ?) ORDER BY row"
        return [_fact_row(r) for r in self.journal.rows(sql, (step, step))]

    def rows_added(self, step: int) -> list[FactRow]:
        return [_fact_row(r) for r in self.journal.rows("SELECT * FROM facts WHERE added = ? ORDER BY row", (step,))]

    def rows_removed(self, step: int) -> list[FactRow]:
        sql = "SELECT * FROM facts WHERE removed = ? ORDER BY row"
        return [_fact_row(r) for r in self.journal.rows(sql, (step,))]

    def snapshot_steps(self) -> list[int]:
        return [r[0] for r in self.journal.rows("SELECT id FROM steps WHERE snapshot = 1 ORDER BY id")]

    # ------------------------------------------------------------------ files
    def _sha(self, name: str) -> str:
        r = self.journal.one("SELECT sha256 FROM files WHERE name = ?", (name,))
        if r is None:
            raise LedgerCorruptError(f"ledger {self.path}: no committed file {name!r}")
        return r[0]

    def read(self, name: str) -> Any:
        """Decode committed file ``name`` after checking its sha256 against the journal."""
        want = self._sha(name)
        try:
            data = (self.path / name).read_bytes()
        except OSError as e:
            raise LedgerCorruptError(f"ledger {self.path}: cannot read {name}: {e}") from None
        got = tensorio.sha256(data)
        if got != want:
            raise LedgerCorruptError(
                f"ledger {self.path}: {name} is corrupt (sha256 {got[:12]}…, journal says {want[:12]}…)"
            )
        try:
            return tensorio.decode(data)
        except Exception as e:  # the checksum matched, so the journal itself vouches for a bad file
            raise LedgerCorruptError(f"ledger {self.path}: {name} cannot be decoded: {e}") from None

    def check_files(self) -> list[tuple[str, str]]:
        """Every problem on disk, as ``(name, problem)``: the journal if SQLite's ``integrity_check``
        fails (a damaged page may not disturb the queries a step makes) or its content digest disagrees
        with its rows (a changed row leaves sound pages), and every committed file that is missing,
        unreadable or has another checksum. Never raises for damage: it is what this reports."""
        bad = [(DB_NAME, f"integrity_check: {msg}") for msg in self.journal.integrity()]
        try:
            if problem := self.journal.digest_problem():
                bad.append((DB_NAME, problem))
            files = self.journal.rows("SELECT name, sha256 FROM files ORDER BY name")
        except LedgerError as e:
            return bad + [(DB_NAME, str(e))]
        for r in files:
            p = self.path / str(r["name"])
            try:
                if not p.is_file():
                    bad.append((r["name"], "missing"))
                elif tensorio.sha256(p.read_bytes()) != r["sha256"]:
                    bad.append((r["name"], "checksum mismatch"))
            except OSError as e:
                bad.append((r["name"], f"unreadable: {e.strerror or e}"))
        return bad

    def file_count(self) -> int:
        return self.journal.one("SELECT COUNT(*) FROM files")[0]

    def _write_file(self, name: str, obj: Any, step: int | None, written: list[tuple[str, str, int, int | None]]) -> None:
        data = tensorio.encode(obj)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)

        atomic_write(self.path / name, write)
        written.append((name, tensorio.sha256(data), len(data), step))

    def kv(self, rows: Sequence[FactRow], layers: Iterable[int]) -> dict[int, tuple[Tensor, Tensor]]:
        """Stored constraints of ``rows``: ``{layer: (K: [d_in, m], V: [d_out, m])}`` float64, in row order."""
        layers = list(layers)
        files: dict[int, dict] = {}
        for r in rows:
            if r.kv_step not in files:
                files[r.kv_step] = self.read(_step_name(r.kv_step))
        widths = {s: self.kv_width(s) for s in files}
        out = {}
        for l in layers:
            Ks, Vs = [], []
            for r in rows:
                w = widths[r.kv_step]
                K, V = files[r.kv_step][f"K.{l}"], files[r.kv_step][f"V.{l}"]
                if (r.kv_col + 1) * w > min(K.shape[1], V.shape[1]):
                    raise LedgerCorruptError(f"ledger {self.path}: fact {r.fact.id!r} points at columns past the end "
                                             f"of step {r.kv_step}'s constraints")
                Ks.append(K[:, r.kv_col * w : (r.kv_col + 1) * w])
                Vs.append(V[:, r.kv_col * w : (r.kv_col + 1) * w])
            out[l] = (
                torch.cat(Ks, 1).to(torch.float64) if Ks else None,
                torch.cat(Vs, 1).to(torch.float64) if Vs else None,
            )
        return out  # type: ignore[return-value]

    def kv_width(self, step: int) -> int:
        """Key columns per fact in ``step``'s constraints file (1 for ledgers older than the option)."""
        w = self.step(step).info.get("kv_width", 1)
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise LedgerCorruptError(f"ledger {self.path}: step {step} records kv_width={w!r}")
        return w

    # ------------------------------------------------------------------ Σ₀ and snapshots
    def sigma0(self, layers: Iterable[int]) -> dict[int, Tensor] | None:
        """Stored Σ₀ per layer, or ``None`` before the first step stored them."""
        layers = list(layers)
        names = [_sigma_name(l) for l in layers]
        have = {r[0] for r in self.journal.rows("SELECT name FROM files WHERE name LIKE 'base/%'")}
        if not have:
            return None
        if not set(names) <= have:
            raise LedgerCorruptError(f"ledger {self.path}: Σ₀ files missing for some of layers {layers}")
        return {l: self.read(n)["sigma0"] for l, n in zip(layers, names)}

    def store_sigma0(self, sigma0: dict[int, Tensor]) -> None:
        written: list = []
        for l, s in sigma0.items():
            self._write_file(_sigma_name(l), {"sigma0": s.to(torch.float64)}, None, written)
        with self.journal.tx():
            self.journal.many("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", written)

    def snapshot(self, step: int, layers: Iterable[int]) -> dict[int, dict]:
        """``{layer: {"state": method state dict, "master": W: [d_out, d_in]}}`` saved after ``step``."""
        return {l: self.read(_snap_name(step, l)) for l in layers}

    # ------------------------------------------------------------------ commit
    def commit(
        self,
        kind: str,
        *,
        add: Sequence[Fact] = (),
        kv: dict[int, tuple[Tensor, Tensor]] | None = None,
        readd: Sequence[FactRow] = (),
        remove: Sequence[FactRow] = (),
        target: int | None = None,
        info: dict | None = None,
        snapshot: dict[int, dict] | None = None,
        targets: Tensor | None = None,
    ) -> StepRecord:
        """Record one step atomically (module docstring): new facts ``add`` with their per-layer
        ``kv`` (w columns per fact, fact-major: columns ``i·w … i·w + w − 1`` are ``add[i]``'s) and, when
        their values were optimised, their z-layer ``targets: [d_z, n·w]``; rows brought back (``readd``)
        or removed (``remove``), and an optional ``snapshot`` of every layer's state after the step.
        Returns the committed record."""
        step = self.last_step + 1
        written: list[tuple[str, str, int, int | None]] = []
        if add:
            assert kv is not None
            width = _kv_width(kv, len(add))
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
                self._write_file(_step_name(step), tensors, step, written)
            if snapshot is not None:
                for l, s in snapshot.items():
                    self._write_file(_snap_name(step, l), s, step, written)
            dropped = self._commit_rows(step, kind, add, readd, remove, target, info or {}, snapshot is not None, written)
        except BaseException:
            for name, *_ in written:  # never committed: these files belong to no step
                try:
                    (self.path / name).unlink()
                except OSError:
                    pass
            raise
        for name in dropped:  # superseded snapshots; a crash here leaves files _recover removes
            try:
                (self.path / name).unlink()
            except OSError:
                pass
        return self.step(step)

    def annotate(self, step: int, extra: dict) -> None:
        """Merge ``extra`` into a committed step's info (e.g. the step report, known only after commit)."""
        info = {**self.step(step).info, **extra}
        with self.journal.tx():
            self.journal.run("UPDATE steps SET info = ? WHERE id = ?", (json.dumps(info, default=str), step))

    def _commit_rows(self, step, kind, add, readd, remove, target, info, snap, written) -> list[str]:
        c = self.journal
        dropped: list[str] = []
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
            if snap:
                old = [s for s in self.snapshot_steps() if s != step][: -(KEEP_SNAPSHOTS - 1) or None]
                for s in old:
                    names = [r[0] for r in c.rows("SELECT name FROM files WHERE step = ? AND name LIKE 'snapshots/%'", (s,))]
                    c.many("DELETE FROM files WHERE name = ?", [(n,) for n in names])
                    c.run("UPDATE steps SET snapshot = 0 WHERE id = ?", (s,))
                    dropped += names
        return dropped


def _kv_width(kv: dict[int, tuple[Tensor, Tensor]], n_facts: int) -> int:
    """Key columns per fact of a step's constraints; every layer's K and V must hold the same ``w·n_facts``."""
    cols = {int(t.shape[1]) for K, V in kv.values() for t in (K, V)}
    if len(cols) != 1 or next(iter(cols)) % n_facts or next(iter(cols)) == 0:
        raise LedgerError(f"a step of {n_facts} facts needs the same whole number of key columns per fact in every "
                          f"layer's K and V, got {sorted(cols)} columns")
    return next(iter(cols)) // n_facts


def _step_name(step: int) -> str:
    return f"steps/step-{step:06d}.safetensors"


def _snap_name(step: int, layer: int) -> str:
    return f"snapshots/snap-{step:06d}-L{layer:03d}.safetensors"


def _sigma_name(layer: int) -> str:
    return f"base/sigma0-L{layer:03d}.safetensors"
