"""A ledger directory's life around the editor: whether a writer could open it now (checked without
writing, so a front end refuses before loading a model), and removing a ledger that a failed first run
left without any step."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .journal import DB_NAME, LOCK_NAME, LedgerCorruptError, LedgerError, lock_free
from .store import Ledger

__all__ = ["check_writable", "discard_empty"]


def check_writable(path: str | os.PathLike) -> None:
    """Refuse early (nothing written) what ``Ledger.open_for_writing(path)`` would refuse for the lock,
    the journal or the path: another writer, a damaged journal, a file or a non-ledger directory. The
    journal's whole hash chain is checked (a writer's own open checks only its newest link)."""
    path = Path(path)
    if Ledger.exists(path):
        if not lock_free(path):
            raise LedgerError(f"ledger {path} is open for writing by another editor (close it first)")
        with Ledger(path) as L:
            if problem := L.journal.digest_problem():
                raise LedgerCorruptError(f"ledger {path}: {problem}; run seqedit verify")
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LedgerError(f"--ledger {path} exists and is not a seqedit ledger (no {DB_NAME}); "
                          "give a new or empty directory")


def discard_empty(path: str | os.PathLike, remove_dir: bool) -> bool:
    """Remove a ledger that holds no step (what a failed first run left), and ``path`` itself if
    ``remove_dir``. Returns whether it did; a ledger with a committed step is never touched."""
    path = Path(path)
    try:
        with Ledger(path) as L:
            if L.last_step:
                return False
    except LedgerError:
        return False
    for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", LOCK_NAME):
        (path / name).unlink(missing_ok=True)
    for sub in ("base", "steps", "snapshots"):
        shutil.rmtree(path / sub, ignore_errors=True)
    if remove_dir:
        try:
            path.rmdir()
        except OSError:
            pass
    return True
