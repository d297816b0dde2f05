"""Planning a ledger step against the facts in force: apply (insert or replace), forget, undo.

A :class:`Plan` names the facts a step adds, the stored rows it brings back and those it removes; what a
method form allows (exact removal, latest-only) comes from its registered capabilities. Nothing here
touches tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..facts import Fact
from ..methods import METHODS, MethodSpec, method_info
from .columns import current_row
from .store import FactRow, Ledger, LedgerError, StepRecord

__all__ = ["Plan", "exact_forms", "plan_apply", "plan_forget", "plan_undo", "plan_undo_step", "refuse"]


def exact_forms() -> list[str]:
    """Labels of the registered forms that can forget and replace facts (exact removal)."""
    return sorted(f"{n}/{a}" for n in METHODS for a, f in method_info(n).forms.items()
                  if f.capabilities.removal != "none")


def refuse(spec: MethodSpec, what: str) -> LedgerError:
    """The error for an operation ``what`` that ``spec``'s form cannot do exactly."""
    return LedgerError(
        f"{spec.label} has no exact removal of constraints, so {what} is not supported "
        f"(methods that support it: {', '.join(exact_forms())}); undo of the latest step is always supported"
    )


@dataclass
class Plan:
    """A step to run: new facts ``add``, rows brought back ``readd`` (undo) and rows removed ``remove``.
    Columns are added in the order ``add`` then ``readd``; removed in ``remove`` order (by row)."""

    kind: str
    add: list[Fact] = field(default_factory=list)
    readd: list[FactRow] = field(default_factory=list)
    remove: list[FactRow] = field(default_factory=list)
    target: int | None = None


def _label(f: Fact) -> str:
    return f"{f.id!r} ({f.subject!r} / {f.prompt!r})"


def plan_apply(facts: Sequence[Fact], in_force: Sequence[FactRow], spec: MethodSpec) -> Plan:
    """Insert ``facts`` (ids assigned); a fact whose slot is in force replaces it (Prop. 3.5). ``in_force``
    needs only the rows in force that hold a slot or an id of ``facts`` (``Ledger.in_force_holding``);
    a latest-only form needs every row in force."""
    caps = spec.capabilities
    seen: dict[tuple[str, str], Fact] = {}
    ids: dict[str, Fact] = {}
    for f in facts:
        if f.slot in seen:
            raise LedgerError(f"one step holds two facts for the same slot: {_label(seen[f.slot])} and {_label(f)}")
        if f.id in ids:
            raise LedgerError(f"one step holds two facts with id {f.id!r}")
        seen[f.slot], ids[f.id] = f, f
    if caps.latest_only:  # memorize_latest: the new batch replaces everything in force
        return Plan("apply", add=list(facts), remove=list(in_force))
    by_slot = {r.fact.slot: r for r in in_force}
    remove = [by_slot[s] for s in seen if s in by_slot]
    if remove and caps.removal == "none":
        raise refuse(spec, f"replacing facts in force ({', '.join(_label(r.fact) for r in remove)})")
    leaving = {r.row for r in remove}
    for r in in_force:
        if r.row not in leaving and r.fact.id in ids:
            raise LedgerError(
                f"fact id {r.fact.id!r} is already in force for another slot ({r.fact.subject!r} / "
                f"{r.fact.prompt!r}); give the new fact another id"
            )
    return Plan("apply", add=list(facts), remove=sorted(remove, key=lambda r: r.row))


def plan_forget(ids: Sequence[str], in_force: Sequence[FactRow], spec: MethodSpec) -> Plan:
    """Remove the facts ``ids``; ``in_force`` needs only the rows in force with those ids."""
    if spec.capabilities.removal == "none":
        raise refuse(spec, "forget")
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise LedgerError("forget needs at least one fact id")
    by_id = {r.fact.id: r for r in in_force}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise LedgerError(f"not in force, cannot forget: {unknown}")
    return Plan("forget", remove=sorted((by_id[i] for i in ids), key=lambda r: r.row))


def plan_undo(rec: StepRecord, last_step: int, added: Sequence[FactRow], removed: Sequence[FactRow],
              in_force: Sequence[FactRow], spec: MethodSpec) -> Plan:
    """Revert step ``rec``: its facts still in force leave, the facts it removed come back. ``in_force``
    needs only the rows in force that hold a slot or an id of ``removed``."""
    if rec.undone_by is not None:
        raise LedgerError(f"step {rec.id} was already undone by step {rec.undone_by}; undo step {rec.undone_by} to redo it")
    if spec.capabilities.removal == "none" and rec.id != last_step:
        raise refuse(spec, f"undo of step {rec.id} (not the latest step, {last_step})")
    leave = [r for r in added if r.removed is None]
    leaving = {r.row for r in leave}
    held = {r.fact.slot: r for r in in_force if r.row not in leaving}
    ids = {r.fact.id: r for r in in_force if r.row not in leaving}
    for r in removed:
        other = held.get(r.fact.slot) or ids.get(r.fact.id)
        if other is not None:
            raise LedgerError(
                f"undo of step {rec.id} would bring back {_label(r.fact)}, but fact {other.fact.id!r} "
                f"(added at step {other.added}) now holds its slot or id; undo or forget that first"
            )
    return Plan("undo", readd=sorted(removed, key=lambda r: r.row), remove=sorted(leave, key=lambda r: r.row), target=rec.id)


def plan_undo_step(ledger: Ledger, step_id: int, spec: MethodSpec) -> Plan:
    """:func:`plan_undo` of ``ledger``'s step ``step_id``, its facts followed through later rekey steps."""
    rec = ledger.step(step_id)
    # a fact re-added by later rekey steps leaves through the row that now carries it
    added = [current_row(ledger, r) for r in ledger.rows_added(step_id)]
    removed = ledger.rows_removed(step_id)
    if rec.kind == "rekey":  # the facts still in force go back to the keys they had before it
        kept = [(old, now) for old, now in zip(removed, (current_row(ledger, r) for r in removed)) if now.removed is None]
        removed, added = [old for old, _ in kept], [now for _, now in kept]
    in_force = ledger.in_force_holding([r.fact for r in removed])
    return plan_undo(rec, ledger.last_step, added, removed, in_force, spec)
