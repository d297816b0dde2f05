"""The durable edit queue: one SQLite file (WAL, ``synchronous=FULL``) of submitted facts and their state.

An edit is written and committed before the API answers ``202``, so an accepted fact survives any crash.
States: ``queued`` → ``applied`` (with the ledger step) or ``rejected`` (with the reason). The fact
stored with each edit carries its edit id in ``meta["serve_edit"]``; the ledger keeps that meta in the
same transaction as the step, which is how :meth:`EditQueue.reconcile` finds edits a crash left
``queued`` although their step was committed (so none is applied twice).

Thread-safe: one connection behind a lock (the API's threads submit, the worker takes batches).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import SeqEditError

__all__ = ["EDIT_META_KEY", "EditQueue", "EditRecord", "IdempotencyConflict", "QueueFull", "STATES"]

EDIT_META_KEY = "serve_edit"
STATES = ("queued", "applied", "rejected")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS edits (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    request TEXT NOT NULL,
    fact TEXT NOT NULL,
    fact_id TEXT NOT NULL,
    state TEXT NOT NULL,
    step INTEGER,
    reason TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS edits_state ON edits(state, seq);
CREATE TABLE IF NOT EXISTS requests (
    key TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    edits TEXT NOT NULL,
    created REAL NOT NULL
)
"""


class IdempotencyConflict(SeqEditError):
    """An idempotency key was reused with a different request body."""


class QueueFull(SeqEditError):
    """Accepting these edits would put more than the limit in the queue (answered 429)."""


@dataclass(frozen=True)
class EditRecord:
    """One queued fact (``fact`` is its JSON form, with ``id`` and ``meta["serve_edit"]`` set)."""

    id: str
    request: str
    fact: dict[str, Any]
    fact_id: str
    state: str
    step: int | None
    reason: str | None
    created: float
    updated: float


def _record(r: sqlite3.Row) -> EditRecord:
    return EditRecord(r["id"], r["request"], json.loads(r["fact"]), r["fact_id"], r["state"], r["step"],
                      r["reason"], r["created"], r["updated"])


class EditQueue:
    """``EditQueue(path)`` opens (or creates) the queue file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        with self._tx():
            for stmt in _SCHEMA.split(";"):
                self.conn.execute(stmt)

    def close(self) -> None:
        with self._lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None  # type: ignore[assignment]

    class _Tx:
        def __init__(self, q: EditQueue) -> None:
            self.q = q

        def __enter__(self) -> sqlite3.Connection:
            self.q._lock.acquire()
            self.q.conn.execute("BEGIN IMMEDIATE")
            return self.q.conn

        def __exit__(self, exc_type: Any, *rest: Any) -> None:
            try:
                self.q.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.q._lock.release()

    def _tx(self) -> EditQueue._Tx:
        return EditQueue._Tx(self)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ submit
    def submit(self, facts: Sequence[dict[str, Any]], key: str | None = None, digest: str = "",
               max_queued: int | None = None) -> list[EditRecord]:
        """Queue ``facts`` (JSON form, without ``meta["serve_edit"]``) durably, one edit each. A fact
        without an id gets its edit id as fact id. A repeated ``key`` with the same ``digest`` returns
        the edits of the first submission; with another digest it raises :class:`IdempotencyConflict`.
        With ``max_queued``, a submission that would leave more queued raises :class:`QueueFull` and
        stores nothing (checked in the same transaction as the insert, so concurrent ones cannot overshoot)."""
        now = time.time()
        request = uuid.uuid4().hex
        with self._tx() as c:
            if key is not None:
                row = c.execute("SELECT digest, edits FROM requests WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    if row["digest"] != digest:
                        raise IdempotencyConflict(f"idempotency key {key!r} was used with a different request")
                    ids = json.loads(row["edits"])
                    rows = [c.execute("SELECT * FROM edits WHERE id = ?", (i,)).fetchone() for i in ids]
                    return [_record(r) for r in rows]
            if max_queued is not None:
                queued = c.execute("SELECT COUNT(*) FROM edits WHERE state = 'queued'").fetchone()[0]
                if queued + len(facts) > max_queued:
                    raise QueueFull(f"the queue holds {queued} edits; {len(facts)} more would pass its limit of "
                                    f"{max_queued}")
            ids = []
            for fact in facts:
                edit_id = "e" + uuid.uuid4().hex[:23]
                stored = {**fact, "id": fact.get("id") or edit_id,
                          "meta": {**(fact.get("meta") or {}), EDIT_META_KEY: edit_id}}
                c.execute("INSERT INTO edits (id, request, fact, fact_id, state, created, updated) "
                          "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                          (edit_id, request, json.dumps(stored), stored["id"], now, now))
                ids.append(edit_id)
            if key is not None:
                c.execute("INSERT INTO requests VALUES (?, ?, ?, ?)", (key, digest, json.dumps(ids), now))
            rows = [c.execute("SELECT * FROM edits WHERE id = ?", (i,)).fetchone() for i in ids]
        return [_record(r) for r in rows]

    # ------------------------------------------------------------------ read
    def get(self, edit_id: str) -> EditRecord | None:
        rows = self._query("SELECT * FROM edits WHERE id = ?", (edit_id,))
        return _record(rows[0]) if rows else None

    def queued(self, limit: int) -> list[EditRecord]:
        """The oldest ``limit`` queued edits, in submission order."""
        return [_record(r) for r in self._query("SELECT * FROM edits WHERE state = 'queued' ORDER BY seq LIMIT ?", (limit,))]

    def counts(self) -> dict[str, int]:
        rows = self._query("SELECT state, COUNT(*) AS n FROM edits GROUP BY state")
        return {s: 0 for s in STATES} | {r["state"]: r["n"] for r in rows}

    def oldest_queued_age(self) -> float | None:
        """Seconds since the oldest queued edit was submitted (``None``: nothing queued)."""
        rows = self._query("SELECT MIN(created) AS t FROM edits WHERE state = 'queued'")
        return None if rows[0]["t"] is None else max(0.0, time.time() - rows[0]["t"])

    def recent(self, limit: int, offset: int = 0) -> list[EditRecord]:
        """Edits newest first."""
        sql = "SELECT * FROM edits ORDER BY seq DESC LIMIT ? OFFSET ?"
        return [_record(r) for r in self._query(sql, (limit, offset))]

    def all(self) -> list[EditRecord]:
        """Every edit, oldest first."""
        return [_record(r) for r in self._query("SELECT * FROM edits ORDER BY seq")]

    # ------------------------------------------------------------------ outcomes
    def mark_applied(self, edit_ids: Iterable[str], step: int) -> None:
        now = time.time()
        with self._tx() as c:
            c.executemany("UPDATE edits SET state = 'applied', step = ?, reason = NULL, updated = ? "
                          "WHERE id = ? AND state = 'queued'", [(step, now, i) for i in edit_ids])

    def mark_rejected(self, edit_id: str, reason: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE edits SET state = 'rejected', reason = ?, updated = ? WHERE id = ? AND state = 'queued'",
                      (reason, time.time(), edit_id))

    def reconcile(self, applied: dict[str, int]) -> int:
        """Mark queued edits found in committed ledger steps (``{edit id: step}``) applied; returns how many."""
        queued = {r["id"] for r in self._query("SELECT id FROM edits WHERE state = 'queued'")}
        hits = {i: s for i, s in applied.items() if i in queued}
        for step in sorted(set(hits.values())):
            self.mark_applied([i for i, s in hits.items() if s == step], step)
        return len(hits)

    def prune_applied(self, before: float) -> int:
        """Delete applied edits last updated before ``before`` (epoch seconds), and idempotency keys as old;
        the edits of the newest applied step stay (they anchor :meth:`max_applied_step`). Returns how many."""
        with self._tx() as c:
            n = c.execute("DELETE FROM edits WHERE state = 'applied' AND updated < ? AND step < "
                          "(SELECT MAX(step) FROM edits WHERE state = 'applied')", (before,)).rowcount
            c.execute("DELETE FROM requests WHERE created < ?", (before,))
        return n

    def max_applied_step(self) -> int:
        rows = self._query("SELECT COALESCE(MAX(step), 0) AS s FROM edits WHERE state = 'applied'")
        return int(rows[0]["s"])
