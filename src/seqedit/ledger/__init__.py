"""Durable sequential editing: the ledger directory, the planning of its steps, restore, verify, export.

``store`` (the directory: SQLite journal + safetensors files, recovery, indexed queries), ``writer``
(atomic commits), ``journal`` (the SQLite connection and its transactions), ``chain`` (the hash chain over
steps that lets verify see a changed row), ``records`` (rows as ``FactRow`` / ``StepRecord``), ``tensorio`` (tensor files),
``manifest`` (what a ledger was built on, and the refusals to continue it otherwise), ``plan`` (apply /
forget / undo against the facts in force), ``session`` (a ledger journalling a
:class:`~seqedit.bank.LayerBank`: commit, restore by snapshot + exact replay, forget, undo),
``verify`` (re-solve and compare), ``export`` (HF directory or weight deltas + loader). Nothing here
needs an editor. See ``docs/ledger.md``.
"""

from .export import apply_delta, load_delta
from .session import LedgerSession
from .store import FactRow, Ledger, LedgerCorruptError, LedgerError, StepRecord
from .verify import VerifyReport

__all__ = [
    "FactRow",
    "Ledger",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerSession",
    "StepRecord",
    "VerifyReport",
    "apply_delta",
    "load_delta",
]
