"""What a ledger step does: which methods support which operations, the planning of apply (insert or
replace) / forget / undo against the facts in force, and the exact per-layer linear algebra.

Per layer the objective is over the stored constraints ``(k_f, v_f)`` of the facts in force (DESIGN §2);
a step adds ``K_add: [d_in, n]`` with targets ``V_add: [d_out, n]`` and removes ``K_rem: [d_in, m]`` /
``V_rem``; residuals are always taken on the current weight, ``R = V − W K``, so the live step and a
replay from stored tensors run the same float operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..facts import Fact
from ..methods import LayerMethodState, MethodSpec
from .store import FactRow, LedgerError, StepRecord

__all__ = ["Capabilities", "Plan", "capabilities", "layer_update", "one_time", "plan_apply", "plan_forget", "plan_undo"]

# Forms whose state exposes an exact add/remove update (LayerSystem or AlphaEditSystem).
_SYSTEM_REMOVAL = {("memit", "aligned"), ("rlsedit", "aligned"), ("alphaedit", "aligned"), ("alphaedit", "full")}
EXACT_FORMS = sorted(f"{n}/{a}" for n, a in _SYSTEM_REMOVAL) + ["memorize_latest/exact"]


@dataclass(frozen=True)
class Capabilities:
    """``removal``: ``"system"`` (exact add/remove update of the layer's system), ``"rebuild"``
    (memorize_latest/exact: re-solve the facts in force, which are at most one batch) or ``"none"``.
    ``exact``: the weights are the one-time solution of the facts in force (``verify`` re-solves it).
    ``latest_only``: every apply forgets all facts in force (memorize_latest)."""

    removal: str
    exact: bool
    latest_only: bool


def capabilities(spec: MethodSpec) -> Capabilities:
    key = (spec.name, spec.alignment)
    if key in _SYSTEM_REMOVAL:
        return Capabilities("system", True, False)
    if key == ("memorize_latest", "exact"):
        return Capabilities("rebuild", True, True)
    return Capabilities("none", False, spec.name == "memorize_latest")


def refuse(spec: MethodSpec, what: str) -> LedgerError:
    return LedgerError(
        f"{spec.label} has no exact removal of constraints, so {what} is not supported "
        f"(methods that support it: {', '.join(EXACT_FORMS)}); undo of the latest step is"
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
    """Insert ``facts`` (ids assigned); a fact whose slot is in force replaces it (Prop. 3.5)."""
    caps = capabilities(spec)
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
    if capabilities(spec).removal == "none":
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
    """Revert step ``rec``: its facts still in force leave, the facts it removed come back."""
    if rec.undone_by is not None:
        raise LedgerError(f"step {rec.id} was already undone by step {rec.undone_by}; undo step {rec.undone_by} to redo it")
    if capabilities(spec).removal == "none" and rec.id != last_step:
        raise refuse(spec, f"undo of step {rec.id} (not the latest step, {last_step})")
    live = {r.row for r in in_force}
    leave = [r for r in added if r.row in live]
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


# ------------------------------------------------------------------------------------- linear algebra


def _cat(*mats: Tensor | None) -> Tensor | None:
    mats = [m for m in mats if m is not None and m.shape[1]]
    return torch.cat(mats, dim=1) if mats else None


def layer_update(state: LayerMethodState, W: Tensor, K_add: Tensor | None, V_add: Tensor | None,
                 K_rem: Tensor | None = None, V_rem: Tensor | None = None) -> Tensor:
    """``Δ: [d_out, d_in]`` that adds ``(K_add, V_add)`` and removes ``(K_rem, V_rem)`` (float64) on ``W``.

    Without removals this is the method's own ``step`` (post-processing, memorize_latest's implicit
    removal); with removals the exact update of the layer's system (methods with ``removal="system"``).
    """
    if K_rem is None or K_rem.shape[1] == 0:
        return state.step(K_add, V_add - W @ K_add, W).applied
    R_add = None if K_add is None or K_add.shape[1] == 0 else V_add - W @ K_add
    return state.system.update(None if R_add is None else K_add, R_add, K_rem, V_rem - W @ K_rem)


def one_time(spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor, K: Tensor | None,
             V: Tensor | None) -> tuple[LayerMethodState, Tensor]:
    """A fresh state solving all of ``(K: [d_in, n], V: [d_out, n])`` in one step from ``W0``, and the
    resulting weight (``W0`` itself when there is nothing in force)."""
    state = spec.init_layer(sigma0, lam, W0)
    if K is None or K.shape[1] == 0:
        return state, W0.clone()
    return state, W0 + state.step(K, V - W0 @ K, W0).applied
