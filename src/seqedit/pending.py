"""An editor's ledger, and a new ledger that exists only once it holds a step.

``Editor(ledger="new/")`` checks the path and builds the manifest (reading the unedited base weights)
but writes nothing: the editor's first step creates the directory, and a first step that fails or is
interrupted removes it again, so a refused or interrupted start leaves nothing behind (neither does
an editor closed before its first commit). An existing ledger is opened at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .bank import LayerBank
from .ledger import Ledger, LedgerError, LedgerSession
from .ledger.directory import discard_empty

__all__ = ["EditorLedger", "PendingLedger"]


@dataclass
class PendingLedger:
    """Where a new ledger will go, with the manifest it will record and its storage settings."""

    path: Path
    manifest: dict
    kv_dtype: str
    snapshot_every: int
    dir_existed: bool

    @classmethod
    def check(cls, path: str | os.PathLike, manifest: dict, kv_dtype: str, snapshot_every: int) -> PendingLedger:
        """Refuse now (nothing written) a path no ledger can be created at: a file (``LedgerError``). A
        directory holding other files may take one (the service keeps its queue beside the ledger)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LedgerError(f"ledger {path} is a file; give a new or empty directory")
        return cls(path, manifest, kv_dtype, snapshot_every, path.exists())

    def create(self) -> Ledger:
        """The ledger, created and opened for writing; refused if another writer created one here since."""
        if Ledger.exists(self.path):
            raise LedgerError(f"ledger {self.path} was created by another editor after this one was set up; "
                              "reopen it with a new Editor")
        return Ledger.open_for_writing(self.path, self.manifest)


class EditorLedger:
    """The ledger and session of an editor (both ``None`` without a ledger or before a new one exists)."""

    def __init__(self) -> None:
        self.lam_for: Callable[[int], float] | None = None  # the λ schedule its session journals
        self.ledger: Ledger | None = None
        self.session: LedgerSession | None = None
        self.pending: PendingLedger | None = None  # a new ledger, created by the first step
        self._created: PendingLedger | None = None  # ... once created, until closed

    def create(self, bank: LayerBank) -> None:
        """Create the pending ledger, if any, with a session on ``bank`` (Σ₀ stored if the bank has it)."""
        p = self.pending
        if p is None:
            return
        self.ledger = p.create()
        self.pending, self._created = None, p
        try:
            self.session = LedgerSession(self.ledger, bank, p.kv_dtype, p.snapshot_every, self.lam_for)
            if bank.ready:  # prepare() ran before the ledger existed
                self.session.store_sigma0(dict(bank.sigma0))
        except BaseException:
            self.discard_new()
            raise

    def discard_new(self) -> None:
        """Remove the ledger created here if it holds no step; the next step would create it again."""
        p = self._created
        if p is None or self.ledger is None or (not self.ledger.closed and self.ledger.last_step):
            return
        self.ledger.close()
        if not discard_empty(p.path, remove_dir=not p.dir_existed):
            # a closed journal cannot say whether it holds a step; the disk did: it does (a later step's
            # commit failed and closed it), so it stays, closed, and nothing is journalled on top of it
            return
        self.ledger, self.session, self._created, self.pending = None, None, None, p

    @contextlib.contextmanager
    def first_step(self) -> Iterator[None]:
        """A first step that fails or is interrupted (KeyboardInterrupt) takes the new ledger with it
        (a ledger not created here, or holding a committed step, stays)."""
        try:
            yield
        except BaseException:
            self.discard_new()
            raise

    def close(self) -> None:
        self.discard_new()
        if self.ledger is not None:
            self.ledger.close()
