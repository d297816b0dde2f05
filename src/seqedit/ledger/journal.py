"""The ledger's SQLite journal: its schema, how it is opened (for writing, or read-only without writing a
byte), SQLite failures as ledger errors, and its transactions, each sealed by the content hash chain
(:mod:`~seqedit.ledger.chain`) that lets ``verify`` see an edited row.

Every query goes through :class:`Journal`, so a damaged journal surfaces as :class:`LedgerCorruptError`
(or :class:`LedgerError` for a busy or unwritable one), never as a raw ``sqlite3.DatabaseError``.
Ledgers of format version 1 (no digest) and 2 (one digest of every row) are read as they are; their
first write moves them to version 3 (:func:`~seqedit.ledger.chain.upgrade`).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import SeqEditError
from . import chain

__all__ = ["DB_NAME", "FORMAT_VERSION", "Journal", "LedgerCorruptError", "LedgerError"]

FORMAT_VERSION = 3  # 2: the journal carries a content digest; 3: a hash chain over steps instead
READABLE_VERSIONS = ("1", "2", "3")
DB_NAME = "ledger.sqlite"
LOCK_NAME = "lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    target INTEGER,
    undone_by INTEGER,
    snapshot INTEGER NOT NULL DEFAULT 0,
    info TEXT NOT NULL,
    link TEXT
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
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    step INTEGER
);
"""
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
        self._held = self._open = self._dirty = False
        self.lost_commit = False  # a held transaction whose parts were released failed to commit
        self._after: list[Callable[[], None]] = []
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
        """One IMMEDIATE transaction, sealed by the rest digest (the caller seals the step it wrote,
        :func:`~seqedit.ledger.chain.seal_step`); rolled back on any error. Inside :meth:`held` it is
        a savepoint of the held transaction instead."""
        if self._held:
            if not self._open:  # the held transaction begins with its first write
                self._begin()
                self._open = True
            self.run("SAVEPOINT part")
            try:
                yield
            except BaseException:
                if self.conn is not None and self.conn.in_transaction:  # SQLite may have rolled back itself
                    self.run("ROLLBACK TO part")
                    self.run("RELEASE part")
                raise
            self.run("RELEASE part")
            self._dirty = True
            return
        self._begin()
        try:
            yield
        except BaseException:
            self._end(commit=False)
            raise
        self._end(commit=True)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Make every :meth:`tx` in the block part of ONE transaction, begun by the first of them and
        committed when the block ends (an apply step's commit and its annotation: one fsync'ed commit
        instead of two; the write lock is not held while the step computes). On an error, what the
        parts already released is committed all the same (the caller's state holds it), and the rest is
        rolled back."""
        if self._held:
            yield
            return
        self._held, self._open, self._dirty = True, False, False
        try:
            yield
        except BaseException:
            self._end_held(commit=self._dirty)
            raise
        self._end_held(commit=True)

    def _end_held(self, commit: bool) -> None:
        self._held = False
        if not self._open:  # nothing was written
            return
        self._open = False
        try:
            self._end(commit)
        except BaseException:
            self.lost_commit = commit and self._dirty
            raise

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the current transaction is committed (never if it is rolled back)."""
        self._after.append(action)

    def _begin(self) -> None:
        self.run("BEGIN IMMEDIATE")
        self._after = []
        try:
            version = self.one("SELECT value FROM meta WHERE key = 'format_version'") if self._has_meta() else None
            if version is not None and version[0] != str(FORMAT_VERSION):
                chain.upgrade(self)
        except BaseException:
            self._end(commit=False)
            raise

    def _has_meta(self) -> bool:
        return self.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'") is not None

    def _end(self, commit: bool) -> None:
        after, self._after = self._after, []
        if not commit:
            if self.conn is not None and self.conn.in_transaction:  # SQLite may have rolled back itself
                with self.errors():
                    self.conn.execute("ROLLBACK")
            return
        if not self.conn.in_transaction:  # an error inside made SQLite roll it back (a full disk, ...)
            raise LedgerError(f"ledger {self.path}: the journal rolled the step's transaction back; nothing was "
                              "committed")
        try:
            self.run("INSERT OR REPLACE INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
            chain.seal_rest(self)
            self.run("COMMIT")
        except BaseException:
            if self.conn is not None and self.conn.in_transaction:
                with self.errors():
                    self.conn.execute("ROLLBACK")
            raise
        # Move the commit into the main file at once: a committed step then never lives only in the
        # write-ahead log, whose damaged tail SQLite would silently drop (and the step's files with it).
        self.rows("PRAGMA wal_checkpoint(TRUNCATE)")
        for action in after:
            action()

    def create(self, manifest: dict) -> None:
        with self.tx():
            for stmt in [*_SCHEMA.split(";"), *chain.INDEXES]:
                if stmt.strip():
                    self.run(stmt)
            self.run("INSERT INTO meta VALUES ('manifest', ?)", (json.dumps(manifest),))

    def meta(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.rows("SELECT key, value FROM meta")}

    # ------------------------------------------------------------------ checks
    def digest_problem(self, full: bool = True) -> str | None:
        """Why the content digest disagrees with the rows (``None``: it agrees, or a version-1 ledger has
        none): the whole hash chain (``full``, O(history)) or its rest, head and newest link (O(step))."""
        return chain.chain_problem(self) if full else chain.tail_problem(self)

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
