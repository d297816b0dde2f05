"""Durable sequential editing: the ledger directory, its planning and exact linear algebra, export.

``store`` (SQLite journal + safetensors files, atomic commits), ``ops`` (which methods support which
operations; planning of apply / forget / undo; per-layer add/remove updates), ``session`` (the
editor's side: reopen, forget, undo, verify), ``export`` (HF directory or weight deltas + loader).
See ``docs/ledger.md``.
"""

from .export import apply_delta, load_delta
from .session import VerifyReport
from .store import FactRow, Ledger, LedgerCorruptError, LedgerError, StepRecord

__all__ = [
    "FactRow",
    "Ledger",
    "LedgerCorruptError",
    "LedgerError",
    "StepRecord",
    "VerifyReport",
    "apply_delta",
    "load_delta",
]
