"""The ledger's SQLite journal: its schema, how it is opened (for writing, or read-only without writing a
byte), SQLite failures as ledger errors, and a content digest that lets ``verify`` see an edited row.

Every query goes through :class:`Journal`, so a damaged journal surfaces as :class:`LedgerCorruptError`
(or :class:`LedgerError` for a busy or unwritable one), never as a raw ``sqlite3.DatabaseError``.

The digest (meta key ``digest``) is the sha256 of every row of every table except itself, rewritten in
each write transaction. SQLite checks its pages (``PRAGMA integrity_check``) but not what a row says: a
byte changed inside a fact's text or a file's checksum leaves a valid page, and only the digest sees it.
Ledgers of format version 1 have none; their first write adds it and moves them to version 2.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import SeqEditError

__all__ = ["DB_NAME", "FORMAT_VERSION", "Journal", "LedgerCorruptError", "LedgerError"]

FORMAT_VERSION = 2  # 2: the journal carries a content digest
READABLE_VERSIONS = ("1", "2")
DB_NAME = "ledger.sqlite"
LOCK_NAME = "lock"
_DIGEST_KEY = "digest"

_SCHEMA = """
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
_TABLES = ("meta", "steps", "facts", "files")
# OperationalErrors that say nothing about the journal's bytes: the file is busy, the disk full, ...
_NOT_DAMAGE = ("locked", "busy", "disk is full", "readonly", "read-only", "unable to open", "disk i/o")


class LedgerError(SeqEditError):
    """A ledger operation was refused: other base model or method, conflicting facts, unsupported op."""


class LedgerCorruptError(LedgerError):
    """The ledger on disk is damaged (checksum mismatch, missing file, unknown format). Nothing was deleted."""


def lock_free(path: Path) -> bool:
    """Whether no process holds ``path``'s writer lock (checked with a read-only descriptor: nothing written)."""
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return True  # no lock file: nobody ever wrote here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the shared lock


class Journal:
    """The connection to ``DIR/ledger.sqlite``. ``read_only=True`` opens it with SQLite's ``mode=ro``
    (``immutable`` when no writer holds the directory and no write-ahead log is pending, so not even
    SQLite's shared-memory file is created); otherwise in WAL mode with ``synchronous=FULL``."""

    def __init__(self, path: Path, *, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        db = path / DB_NAME
        self.conn: sqlite3.Connection | None = None
        with self.errors():
            if read_only:
                quiet = lock_free(path) and not (path / f"{DB_NAME}-wal").exists()
                uri = f"file:{quote(str(db.resolve()))}?mode=ro" + ("&immutable=1" if quiet else "")
                self.conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            else:
                self.conn = sqlite3.connect(db, isolation_level=None)  # explicit BEGIN/COMMIT in tx()
            self.conn.row_factory = sqlite3.Row
            if not read_only:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")

    # ------------------------------------------------------------------ errors
    @contextmanager
    def errors(self) -> Iterator[None]:
        """SQLite failures as ledger errors; ``IntegrityError`` passes (callers give it a meaning)."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as e:
            msg = str(e)
            if isinstance(e, sqlite3.OperationalError) and any(s in msg.lower() for s in _NOT_DAMAGE):
                raise LedgerError(f"ledger {self.path}: the journal {DB_NAME} cannot be used: {msg}") from None
            raise LedgerCorruptError(f"ledger {self.path}: cannot read its journal {DB_NAME}: {msg}") from None
        except UnicodeDecodeError as e:  # a text column whose bytes are no longer UTF-8
            raise LedgerCorruptError(f"ledger {self.path}: its journal {DB_NAME} holds damaged text: {e}") from None

    # ------------------------------------------------------------------ queries
    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self.errors():
            return [self._typed(r) for r in self.conn.execute(sql, tuple(params)).fetchall()]

    def one(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        with self.errors():
            row = self.conn.execute(sql, tuple(params)).fetchone()
        return None if row is None else self._typed(row)

    def _typed(self, row: sqlite3.Row) -> sqlite3.Row:
        """``row``, refused if it holds a blob: seqedit never writes one, but a damaged record header can
        make SQLite read a text column as one, and every reader (the digest's JSON first) expects text."""
        if any(isinstance(v, bytes) for v in row):
            raise LedgerCorruptError(f"ledger {self.path}: its journal {DB_NAME} holds a blob where text was "
                                     "written (a damaged record)")
        return row

    def run(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Execute a write; the number of rows it changed."""
        with self.errors():
            return self.conn.execute(sql, tuple(params)).rowcount

    def many(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        with self.errors():
            self.conn.executemany(sql, rows)

    @contextmanager
    def tx(self) -> Iterator[None]:
        """One IMMEDIATE transaction, ending with the new digest; rolled back on any error."""
        self.run("BEGIN IMMEDIATE")
        try:
            yield
            self.run("INSERT OR REPLACE INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
            self.run("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_DIGEST_KEY, self.digest()))
        except BaseException:
            with self.errors():
                self.conn.execute("ROLLBACK")
            raise
        self.run("COMMIT")
        # Move the commit into the main file at once: a committed step then never lives only in the
        # write-ahead log, whose damaged tail SQLite would silently drop (and the step's files with it).
        self.rows("PRAGMA wal_checkpoint(TRUNCATE)")

    def create(self, manifest: dict) -> None:
        with self.tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.run(stmt)
            self.run("INSERT INTO meta VALUES ('manifest', ?)", (json.dumps(manifest),))

    def meta(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.rows("SELECT key, value FROM meta")}

    # ------------------------------------------------------------------ checks
    def digest(self) -> str:
        """sha256 of every row of every table but the digest's own (table scans, sorted here: damage
        to an index page is ``integrity_check``'s to report and does not change this)."""
        h = hashlib.sha256()
        for table in _TABLES:
            rows = sorted(json.dumps([table, *r]) for r in self.rows(f"SELECT * FROM {table}"))
            for line in rows:
                if not line.startswith(f'["meta", "{_DIGEST_KEY}",'):
                    h.update(line.encode("utf-8", "surrogatepass") + b"\n")
        return h.hexdigest()

    def digest_problem(self) -> str | None:
        """Why the stored digest disagrees with the rows (``None``: it agrees, or a version-1 ledger has none)."""
        meta = self.meta()
        stored = meta.get(_DIGEST_KEY)
        if stored is None:
            return None if meta.get("format_version") == "1" else "its content digest is missing"
        if stored != self.digest():
            return "its content digest does not match its rows (a row was changed outside seqedit)"
        return None

    def integrity(self) -> list[str]:
        """SQLite's ``integrity_check`` findings (empty when the pages are sound)."""
        try:
            found = [r[0] for r in self.rows("PRAGMA integrity_check")]
        except LedgerError as e:
            return [str(e)]
        # one finding per line; SQLite heads a group of them with "*** in database main ***"
        lines = [line.strip() for m in found for line in str(m).splitlines()]
        return [line for line in lines if line and line != "ok" and not line.startswith("***")]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
