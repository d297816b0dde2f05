"""Reading a ledger's per-fact columns beyond ``Ledger.kv``: the z-layer targets stored with optimised
values, the rows grouped by how their keys were read, and the row that now carries a fact after rekey
steps (``seqedit.rekey``) re-added it."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .journal import LedgerCorruptError, LedgerError
from .records import FactRow, fact_row, step_name
from .store import Ledger

__all__ = ["column_groups", "current_row", "first_added", "targets"]


def _kind(ledger: Ledger, step: int) -> str:
    # the kind alone: ``Ledger.step`` also lists every fact the step added, which a rekey makes all of them
    return ledger.journal.one("SELECT kind FROM steps WHERE id = ?", (step,))[0]


def current_row(ledger: Ledger, row: FactRow) -> FactRow:
    """The row that now carries ``row``'s fact (in force or not): ``row`` itself, or the row that a rekey
    step, or an undo or redo of one, re-added the same fact with when it removed ``row`` (followed to
    the last such row)."""
    while row.removed is not None and _kind(ledger, row.removed) in ("rekey", "undo"):
        r = ledger.journal.one("SELECT n.* FROM facts n JOIN facts o ON o.row = ? WHERE n.added = o.removed "
                               "AND n.fact_id = o.fact_id AND n.fact = o.fact", (row.row,))
        if r is None:
            break
        row = fact_row(r)
    return row


def first_added(ledger: Ledger, row: FactRow) -> int:
    """The step that first put ``row``'s fact in force: ``row.added``, or, for a row a rekey step (or an
    undo or redo of one) re-made, the step that added the row it re-made (followed back)."""
    while _kind(ledger, row.added) in ("rekey", "undo"):
        r = ledger.journal.one("SELECT o.* FROM facts o JOIN facts n ON n.row = ? WHERE o.removed = n.added "
                               "AND o.fact_id = n.fact_id AND o.fact = n.fact", (row.row,))
        if r is None:
            break
        row = fact_row(r)
    return row.added


def targets(ledger: Ledger, rows: Sequence[FactRow]) -> Tensor:
    """Stored z-layer targets of ``rows``: ``Z: [d_z, m]`` float64, the rows' columns in row order (as
    ``Ledger.kv``). Steps whose values were given rather than optimised (``Editor.apply_kv``) and
    ledgers older than the field store none: refused, naming the step."""
    files = {s: ledger.read(step_name(s)) for s in dict.fromkeys(r.kv_step for r in rows)}
    for s, f in files.items():
        if "Z" not in f:
            raise LedgerError(f"ledger {ledger.path}: step {s} stores no z-layer targets (its values were given, "
                              "not optimised, or it was written before seqedit stored them), so its facts' "
                              "keys cannot be re-read and re-solved")
    width = {s: ledger.kv_width(s) for s in files}  # once per step, as Ledger.kv
    cols = []
    for r in rows:
        w = width[r.kv_step]
        Z = files[r.kv_step]["Z"]
        if (r.kv_col + 1) * w > Z.shape[1]:
            raise LedgerCorruptError(f"ledger {ledger.path}: fact {r.fact.id!r} points at columns past the end "
                                     f"of step {r.kv_step}'s targets")
        cols.append(Z[:, r.kv_col * w : (r.kv_col + 1) * w])
    return torch.cat(cols, 1).to(torch.float64)


def column_groups(ledger: Ledger, rows: Sequence[FactRow]) -> list[tuple[str, int, list[int], Tensor]]:
    """``rows`` grouped by how their keys were read: ``(prompt_format, width, row indices, column
    indices)`` per group, the columns being those of ``Ledger.kv``'s row-order layout (w per row)."""
    steps = dict.fromkeys(r.kv_step for r in rows)
    width = {s: ledger.kv_width(s) for s in steps}
    fmt = {s: ledger.step(s).info.get("prompt_format", "bare") for s in steps}
    starts, col = [], 0
    for r in rows:
        starts.append(col)
        col += width[r.kv_step]
    out = []
    for key in sorted({(fmt[s], width[s]) for s in steps}):
        idx = [i for i, r in enumerate(rows) if (fmt[r.kv_step], width[r.kv_step]) == key]
        out.append((key[0], key[1], idx, torch.tensor([starts[i] + j for i in idx for j in range(key[1])])))
    return out
