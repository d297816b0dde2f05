"""What a ledger's journal rows mean: a fact's life in force (:class:`FactRow`), a committed step
(:class:`StepRecord`), their decoding from rows (damage as :class:`LedgerCorruptError`), and the names of
the ledger's tensor files."""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..facts import Fact
from .journal import LedgerCorruptError, LedgerError

__all__ = ["SNAP_FILE", "STEP_FILE", "ColumnRow", "FactRow", "StepRecord", "fact_row", "kv_width_of", "sigma_name",
           "snap_name", "step_info", "step_name"]

STEP_FILE = re.compile(r"^step-(\d+)\.safetensors$")
SNAP_FILE = re.compile(r"^snap-(\d+)-L(\d+)\.safetensors$")


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

    @property
    def fact_id(self) -> str:
        return self.fact.id


@dataclass(frozen=True)
class ColumnRow:
    """Where a fact keeps its constraints (all ``Ledger.kv`` reads), its fact left undecoded: what
    ``verify`` needs of every fact in force, at a fraction of a :class:`FactRow`'s cost."""

    row: int
    fact_id: str
    kv_step: int
    kv_col: int


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


def fact_row(r: sqlite3.Row) -> FactRow:
    """A ``facts`` row as a :class:`FactRow` (its fact validated)."""
    try:
        fact = Fact.from_dict(json.loads(r["fact"]))
    except (ValueError, TypeError) as e:  # FactError is a ValueError
        raise LedgerCorruptError(f"the journal's fact row {r['row']} is damaged: {e}") from None
    return FactRow(r["row"], fact, r["kv_step"], r["kv_col"], r["added"], r["removed"])


def step_info(r: sqlite3.Row) -> dict[str, Any]:
    """The ``info`` JSON object of a ``steps`` row (needs its ``id`` and ``info`` columns)."""
    try:
        info = json.loads(r["info"])
    except (ValueError, TypeError):
        info = None
    if not isinstance(info, dict):
        raise LedgerCorruptError(f"the journal's row of step {r['id']} is damaged (its info is not a JSON object)")
    return info


def kv_width_of(kv: dict[int, tuple[Tensor, Tensor]], n_facts: int) -> int:
    """Key columns per fact of a step's constraints; every layer's K and V must hold the same ``w·n_facts``."""
    cols = {int(t.shape[1]) for K, V in kv.values() for t in (K, V)}
    if len(cols) != 1 or next(iter(cols)) % n_facts or next(iter(cols)) == 0:
        raise LedgerError(f"a step of {n_facts} facts needs the same whole number of key columns per fact in every "
                          f"layer's K and V, got {sorted(cols)} columns")
    return next(iter(cols)) // n_facts


def step_name(step: int) -> str:
    return f"steps/step-{step:06d}.safetensors"


def snap_name(step: int, layer: int) -> str:
    return f"snapshots/snap-{step:06d}-L{layer:03d}.safetensors"


def sigma_name(layer: int) -> str:
    return f"base/sigma0-L{layer:03d}.safetensors"
