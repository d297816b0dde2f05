"""The ledger directory: an SQLite journal (manifest, steps, facts, file checksums) and tensor files.

Layout of ``DIR/``::

    ledger.sqlite                       WAL journal, synchronous=FULL (tables meta, steps, facts, files)
    lock                                flock'ed by the one process that may write
    base/sigma0-L006.safetensors        Σ₀ of each edited layer (float64), written once
    steps/step-000001.safetensors       per-layer K.{ℓ}: [d_in, n], V.{ℓ}: [d_out, n] of the facts a step added,
                                        and Z: [d_z, n], their z-layer targets (steps that optimised values)
    snapshots/snap-000010-L006.safetensors   method state + float64 weight of a layer after a step

:class:`Ledger` opens the directory (read-only, or exclusively for writing), recovers from an interrupted
step and answers the journal's queries through its indexes, so a query about a step reads that step's
rows only. Writing is :mod:`~seqedit.ledger.writer`'s (commit protocol there); a committed row whose file
is missing or has another checksum is corruption, reported and never repaired by deleting anything.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Sequence

import fcntl
import torch
from torch import Tensor

from ..facts import Fact
from . import tensorio, writer
from .journal import (
    DB_NAME, FORMAT_VERSION, LOCK_NAME, READABLE_VERSIONS, Journal, LedgerCorruptError, LedgerError,
)
from .records import (
    SNAP_FILE, STEP_FILE, ColumnRow, FactRow, StepRecord, fact_row, sigma_name, snap_name, step_info, step_name,
)

__all__ = ["FORMAT_VERSION", "FactRow", "Ledger", "LedgerCorruptError", "LedgerError", "StepRecord"]

# What a manifest must hold for the ledger to be reopened (a damaged one fails here, not later).
_MANIFEST_KEYS = {"base": dict, "method": dict, "method_label": str, "hparams": dict, "kv_dtype": str,
                  "snapshot_every": int}


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
                if problem := self.journal.digest_problem(full=False):  # before _recover may delete a file
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
        present: set[str] = set()  # one directory listing, not a stat per committed file
        for sub in ("base", "steps", "snapshots"):
            d = self.path / sub
            if not d.is_dir():
                continue
            for p in d.iterdir():
                name = f"{sub}/{p.name}"
                if name in known:
                    present.add(name)
                    continue
                m = STEP_FILE.match(p.name) or SNAP_FILE.match(p.name)
                interrupted = p.name.startswith(".") and p.name.endswith(".tmp")  # atomic_write temp
                interrupted |= bool(m) and (int(m.group(1)) > last or sub == "snapshots")
                interrupted |= sub == "base" and p.name.startswith("sigma0-")
                if interrupted:
                    p.unlink()
                    self.recovered.append(name)
        missing = [n for n in known - present if not (self.path / n).is_file()]
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
            step_info(r),
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
        return [fact_row(r) for r in self.journal.rows("SELECT * FROM facts WHERE removed IS NULL ORDER BY row")]

    def in_force_holding(self, facts: Sequence[Fact]) -> list[FactRow]:
        """Rows in force that hold the slot or the id of any of ``facts``, by row (index lookups: the cost
        grows with ``len(facts)``, not with the facts in force)."""
        found: dict[int, sqlite3.Row] = {}
        for f in facts:
            for r in self.journal.rows("SELECT * FROM facts INDEXED BY facts_slot_in_force WHERE removed IS NULL "
                                       "AND slot_subject = ? AND slot_prompt = ?", f.slot):
                found[r["row"]] = r
        found |= {r["row"]: r for r in self._in_force_with_ids([f.id for f in facts])}
        return [fact_row(found[k]) for k in sorted(found)]

    def in_force_with_ids(self, ids: Sequence[str]) -> list[FactRow]:
        """Rows in force whose fact id is one of ``ids``, by row (index lookups)."""
        return [fact_row(r) for r in sorted(self._in_force_with_ids(ids), key=lambda r: r["row"])]

    def _in_force_with_ids(self, ids: Sequence[str]) -> list[sqlite3.Row]:
        ids = list(dict.fromkeys(i for i in ids if i))
        out: list[sqlite3.Row] = []
        for lo in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            part = ids[lo : lo + 500]
            # named: for an IN list SQLite's planner prefers facts_removed, i.e. every row in force
            out += self.journal.rows(f"SELECT * FROM facts INDEXED BY facts_id_in_force WHERE removed IS NULL AND "
                                     f"fact_id IN ({', '.join('?' * len(part))})", part)
        return out

    def in_force_columns(self) -> list[ColumnRow]:
        """Where each fact in force keeps its constraints, in row order (facts not decoded)."""
        return [ColumnRow(*r) for r in self.journal.rows("SELECT row, fact_id, kv_step, kv_col FROM facts "
                                                         "WHERE removed IS NULL ORDER BY row")]

    def count_in_force(self) -> int:
        return self.journal.one("SELECT COUNT(*) FROM facts WHERE removed IS NULL")[0]

    def in_force_after(self, step: int) -> list[FactRow]:
        """Facts that were in force right after ``step``."""
        sql = "SELECT * FROM facts WHERE added <= ? AND (removed IS NULL OR removed > ?) ORDER BY row"
        return [fact_row(r) for r in self.journal.rows(sql, (step, step))]

    def rows_added(self, step: int) -> list[FactRow]:
        return [fact_row(r) for r in self.journal.rows("SELECT * FROM facts WHERE added = ? ORDER BY row", (step,))]

    def rows_removed(self, step: int) -> list[FactRow]:
        sql = "SELECT * FROM facts WHERE removed = ? ORDER BY row"
        return [fact_row(r) for r in self.journal.rows(sql, (step,))]

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

    def kv(self, rows: Sequence[FactRow | ColumnRow], layers: Iterable[int]) -> dict[int, tuple[Tensor, Tensor]]:
        """Stored constraints of ``rows``: ``{layer: (K: [d_in, m], V: [d_out, m])}`` float64, in row order
        (``(None, None)`` per layer for no rows). One gather per step file and layer, not one per row."""
        layers = list(layers)
        files: dict[int, dict] = {}
        for r in rows:
            if r.kv_step not in files:
                files[r.kv_step] = self.read(step_name(r.kv_step))
        widths = {s: self.kv_width(s) for s in files}
        cols = {s: min(f[f"{w}.{l}"].shape[1] for l in layers for w in "KV") if layers else 0 for s, f in files.items()}
        pos: dict[int, list[int]] = {s: [] for s in files}  # output columns of each step's rows ...
        src: dict[int, list[int]] = {s: [] for s in files}  # ... and their columns in the step's file
        m = 0
        for r in rows:
            w = widths[r.kv_step]
            if layers and (r.kv_col + 1) * w > cols[r.kv_step]:
                raise LedgerCorruptError(f"ledger {self.path}: fact {r.fact_id!r} points at columns past the end "
                                         f"of step {r.kv_step}'s constraints")
            pos[r.kv_step] += range(m, m + w)
            src[r.kv_step] += range(r.kv_col * w, (r.kv_col + 1) * w)
            m += w
        out = {}
        for l in layers:
            if not rows:
                out[l] = (None, None)
                continue
            pair = []
            for name in ("K", "V"):
                rows_dim = next(iter(files.values()))[f"{name}.{l}"].shape[0]
                T = torch.empty(rows_dim, m, dtype=torch.float64)
                for s, f in files.items():
                    T[:, torch.tensor(pos[s])] = f[f"{name}.{l}"][:, torch.tensor(src[s])].to(torch.float64)
                pair.append(T)
            out[l] = (pair[0], pair[1])
        return out  # type: ignore[return-value]

    def kv_width(self, step: int) -> int:
        """Key columns per fact in ``step``'s constraints file (1 for ledgers older than the option)."""
        r = self.journal.one("SELECT id, info FROM steps WHERE id = ?", (step,))
        if r is None:
            raise LedgerCorruptError(f"ledger {self.path}: rows name step {step}, which does not exist")
        w = step_info(r).get("kv_width", 1)
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise LedgerCorruptError(f"ledger {self.path}: step {step} records kv_width={w!r}")
        return w

    # ------------------------------------------------------------------ Σ₀ and snapshots
    def sigma0(self, layers: Iterable[int]) -> dict[int, Tensor] | None:
        """Stored Σ₀ per layer, or ``None`` before the first step stored them."""
        layers = list(layers)
        names = [sigma_name(l) for l in layers]
        have = {r[0] for r in self.journal.rows("SELECT name FROM files WHERE name LIKE 'base/%'")}
        if not have:
            return None
        if not set(names) <= have:
            raise LedgerCorruptError(f"ledger {self.path}: Σ₀ files missing for some of layers {layers}")
        return {l: self.read(n)["sigma0"] for l, n in zip(layers, names)}

    def store_sigma0(self, sigma0: dict[int, Tensor]) -> None:
        writer.store_sigma0(self, sigma0)

    def snapshot(self, step: int, layers: Iterable[int]) -> dict[int, dict]:
        """``{layer: {"state": method state dict, "master": W: [d_out, d_in]}}`` saved after ``step``."""
        return {l: self.read(snap_name(step, l)) for l in layers}

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
        """Record one step atomically (:mod:`~seqedit.ledger.writer`): new facts ``add`` with their per-layer
        ``kv`` (w columns per fact, fact-major: columns ``i·w … i·w + w − 1`` are ``add[i]``'s) and, when
        their values were optimised, their z-layer ``targets: [d_z, n·w]``; rows brought back (``readd``)
        or removed (``remove``), and an optional ``snapshot`` of every layer's state after the step.
        Returns the committed record."""
        step = writer.commit(self, kind, add=add, kv=kv, readd=readd, remove=remove, target=target, info=info,
                             snapshot=snapshot, targets=targets)
        return self.step(step)

    def annotate(self, step: int, extra: dict) -> None:
        """Merge ``extra`` into the newest step's info (e.g. the step report, known only after commit)."""
        writer.annotate(self, step, extra)

    @contextmanager
    def held(self) -> Iterator[None]:
        """One journal transaction for every write in the block (a step's commit and its annotation). If
        committing it fails, the ledger is closed: the caller's state may hold a step the journal lost."""
        try:
            with self.journal.held():
                yield
        except BaseException:
            if self.journal is not None and self.journal.lost_commit:
                self.close()
            raise
