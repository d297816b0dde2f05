"""A ledger bound to a layer bank: every change to the bank's layers is journalled, and a reopened
ledger restores the bank to its last committed step (newest snapshot, then an exact replay).

:class:`LedgerSession` is what an editor holds when it is durable. It plans steps against the facts in
force (:mod:`~seqedit.ledger.plan`), solves each layer from per-fact constraints rounded to the storage
dtype (so a replay from the stored tensors repeats the exact float operations), commits, and runs
forget / undo / verify. It needs a :class:`~seqedit.bank.LayerBank`, never an editor.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Sequence

from torch import Tensor

from ..bank import LayerBank
from ..facts import Fact
from ..methods import MethodSpec
from . import tensorio
from .plan import Plan, plan_apply, plan_forget, plan_undo_step
from .store import FactRow, Ledger, LedgerCorruptError, LedgerError, StepRecord
from .verify import VerifyReport, verify

__all__ = ["Constraints", "LedgerSession", "check_journalable"]

Constraints = dict[int, tuple[Tensor, Tensor]]  # layer -> (K: [d_in, n], V: [d_out, n]) as stored


def check_journalable(spec: MethodSpec) -> None:
    """Refuse forms with an end-of-run update: a ledger stays open, so there is no end of run."""
    if spec.capabilities.finalize:
        others = [f"{spec.name}/{a}" for a, f in spec.info.forms.items() if not f.capabilities.finalize]
        raise LedgerError(
            f"{spec.label} {spec.form.doc or 'applies an end-of-run update'} (finalize), which has "
            f"no meaning for a ledger that stays open" + (f"; use {' or '.join(others)}" if others else "")
        )


class LedgerSession:
    """``ledger`` (open for writing) journalling ``bank``; ``kv_dtype`` is the storage precision of the
    per-fact keys and values, ``snapshot_every`` the steps between snapshots of the bank.

    ``lam_for`` is a λ schedule (facts in force -> λ, ``EditHParams.lam_for``; ``None``: λ constant). Every
    step that changes the facts in force first re-forms the bank for the λ of the facts in force after it
    (``LayerBank.set_lam``), and every step records the bank's λ after it (``info["lam"]``): a replay
    re-forms at the recorded λ before it redoes a step, so it repeats the live float operations, and a
    snapshot is installed at its step's λ. The weights are then always the one-time solution of the
    facts in force under their λ, which is what ``verify`` re-solves (``bank.one_time`` at ``bank.lam``).
    """

    def __init__(self, ledger: Ledger, bank: LayerBank, kv_dtype: str, snapshot_every: int,
                 lam_for: Callable[[int], float] | None = None) -> None:
        check_journalable(bank.spec)
        self.ledger = ledger
        self.bank = bank
        self.kv_dtype = tensorio.as_dtype(kv_dtype)
        self.snapshot_every = snapshot_every
        self.lam_for = lam_for

    def lam_after(self, plan: Plan) -> float | None:
        """λ for the facts in force after ``plan`` (``None`` without a schedule)."""
        if self.lam_for is None:
            return None
        n = self.open().count_in_force() + len(plan.add) + len(plan.readd) - len(plan.remove)
        return self.lam_for(n)

    @property
    def spec(self) -> MethodSpec:
        return self.bank.spec

    def open(self) -> Ledger:
        """The ledger, or an error if it was closed."""
        if self.ledger.closed:
            raise LedgerError("this editor's ledger was closed; reopen it with Editor(model, ledger=...)")
        return self.ledger

    # ------------------------------------------------------------------ Σ₀ and restore
    def sigma0(self) -> dict[int, Tensor] | None:
        return self.ledger.sigma0(self.bank.layers)

    def store_sigma0(self, sigma0: dict[int, Tensor]) -> None:
        self.ledger.store_sigma0(sigma0)

    def restore(self) -> None:
        """Bring the bank (freshly initialised on the base weights) to the last committed step."""
        L = self.ledger
        snaps = L.snapshot_steps()
        start = snaps[-1] if snaps else 0
        if start:
            self._load_step(start)
        for s in range(start + 1, L.last_step + 1):
            rec = L.step(s)
            if self.bank.capabilities.removal == "none" and rec.kind != "apply" and rec.target - 1 not in (0, *snaps):
                raise LedgerCorruptError(f"ledger {L.path}: no snapshot to replay undo step {s}")
            self._replay(rec)

    def _load_step(self, step: int) -> None:
        """The bank as saved after ``step`` (``0``: the initial state), at the λ that step recorded."""
        if step == 0:
            self.bank.load(None)
            return
        self.bank.load(self.ledger.snapshot(step, self.bank.layers), lam=self.ledger.step(step).info.get("lam"))

    def _replay(self, rec: StepRecord) -> None:
        """Redo committed step ``rec`` from the stored (k, v): no value optimisation, and the same float
        operations as when it was first run."""
        L, caps = self.ledger, self.bank.capabilities
        add, remove = L.rows_added(rec.id), L.rows_removed(rec.id)
        if rec.info.get("lam") is not None:  # as live: re-formed first (a no-op at an unchanged λ, e.g. a rekey)
            self.bank.set_lam(rec.info["lam"])
        if rec.kind == "apply":
            # memorize_latest's removal of the previous batch is implicit in its step()
            self._columns(add, remove if caps.removal == "system" else [])
        elif rec.kind == "rekey":  # every fact in force re-solved from W₀ on its new keys, as it was live
            self._rebuild(L.in_force_after(rec.id))
        elif caps.removal == "none":
            self._load_step(rec.target - 1)
        elif caps.removal == "rebuild":
            self._rebuild(L.in_force_after(rec.id))
        else:
            self._columns(add, remove)

    def _columns(self, add: list[FactRow], remove: list[FactRow]) -> dict[int, float]:
        """Add the stored columns of ``add`` and remove those of ``remove`` in every layer (exact update);
        returns ‖Δ_ℓ‖_F per layer."""
        norms: dict[int, float] = {}
        if not add and not remove:
            return norms
        bank, layers = self.bank, self.bank.layers
        kv_a, kv_r = self.ledger.kv(add, layers), self.ledger.kv(remove, layers)
        for l in layers:
            delta = bank.update(l, *kv_a[l], *kv_r[l])
            bank.write(l, delta)
            norms[l] = float(delta.norm())
        return norms

    def _rebuild(self, rows: list[FactRow]) -> dict[int, float]:
        """Re-solve ``rows`` from the base weights in every layer (memorize_latest)."""
        kv = self.ledger.kv(rows, self.bank.layers)
        norms: dict[int, float] = {}
        for l in self.bank.layers:
            before = self.bank.master[l]
            self.bank.replace(l, *self.bank.one_time(l, *kv[l]))
            norms[l] = float((self.bank.master[l] - before).norm())
        return norms

    # ------------------------------------------------------------------ apply
    def plan_apply(self, facts: Sequence[Fact]) -> Plan:
        """Plan inserting ``facts`` against the rows in force that hold their slots or ids (index
        lookups; a latest-only form replaces everything in force, which is its last batch)."""
        L = self.open()
        held = L.in_force() if self.spec.capabilities.latest_only else L.in_force_holding(facts)
        return plan_apply(facts, held, self.spec)

    def one_transaction(self) -> AbstractContextManager[None]:
        """The block's journal writes (an apply step's commit and its annotation) as one transaction."""
        return self.open().held()

    def removed_kv(self, plan: Plan) -> Constraints | None:
        """Stored (K, V) per layer of the facts ``plan`` replaces (exact-removal forms only; memorize_latest
        removes its previous batch inside its own step)."""
        if not plan.remove or self.bank.capabilities.removal != "system":
            return None
        return self.ledger.kv(plan.remove, self.bank.layers)

    def commit_apply(self, facts: list[Fact], plan: Plan, constraints: Constraints,
                     update_norms: dict[int, float], hparams: dict[str, Any],
                     prompt_format: str | None = None, targets: Tensor | None = None) -> StepRecord:
        """Commit an apply step; ``prompt_format`` is the format its keys and values were read in and
        ``targets: [d_z, n·w]`` the facts' z-layer targets (both ``None``: keys and values were given,
        ``Editor.apply_kv``)."""
        L = self.ledger
        info = {"update_norms": {str(k): v for k, v in update_norms.items()}, "hparams": hparams,
                "lam": self.bank.lam}
        if prompt_format is not None:
            info["prompt_format"] = prompt_format
        return L.commit("apply", add=facts, kv=constraints, remove=plan.remove, info=info,
                        snapshot=self._snapshot_if_due(L.last_step + 1),
                        targets=None if targets is None else targets.to(self.kv_dtype).cpu())

    def commit_rekey(self, rows: list[FactRow], constraints: Constraints, targets: Tensor,
                     info: dict[str, Any]) -> StepRecord:
        """Commit a rekey step: every row in force (``rows``, in order) leaves and its fact comes back with
        the new ``constraints`` (as stored, row order) and its unchanged ``targets``. Always snapshotted,
        so a reopen never has to replay the re-solve from W₀."""
        return self.ledger.commit("rekey", add=[r.fact for r in rows], kv=constraints, remove=rows,
                                  info={**info, "lam": self.bank.lam},
                                  snapshot=self.bank.snapshot(), targets=targets.to(self.kv_dtype).cpu())

    def round_kv(self, K: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        """``(K, V)`` rounded to the storage dtype, on the host: what a replay will read back."""
        return K.to(self.kv_dtype).cpu(), V.to(self.kv_dtype).cpu()

    def _snapshot_if_due(self, step: int) -> dict[int, dict] | None:
        # Forms without exact removal restore their previous state for undo, so they snapshot every step.
        if self.bank.capabilities.removal == "none" or step % self.snapshot_every == 0:
            return self.bank.snapshot()
        return None

    # ------------------------------------------------------------------ forget, undo, verify
    def forget(self, ids: Sequence[str]) -> StepRecord:
        return self._execute(plan_forget(ids, self.open().in_force_with_ids(ids), self.spec))

    def undo(self, step_id: int) -> StepRecord:
        L = self.open()
        plan = plan_undo_step(L, step_id, self.spec)
        return self._execute(plan)

    def _execute(self, plan: Plan) -> StepRecord:
        """Run and commit a forget or undo ``plan`` (all-or-nothing)."""
        L, caps = self.ledger, self.bank.capabilities
        sec: dict[str, float] = {}
        with self.bank.transaction():
            t = time.perf_counter()
            lam = self.lam_after(plan)
            if lam is not None:
                self.bank.set_lam(lam)
            if caps.removal == "none":  # undo of the latest step: the state saved before it
                self._load_step(plan.target - 1)
                norms: dict[int, float] = {}
            elif caps.removal == "rebuild":  # the facts in force afterwards, in the order replay reads them
                leaving = {r.row for r in plan.remove}
                norms = self._rebuild([r for r in L.in_force() if r.row not in leaving] + plan.readd)
            else:
                norms = self._columns(plan.readd, plan.remove)
            sec["solve"] = time.perf_counter() - t
            t = time.perf_counter()
            info = {"update_norms": {str(k): v for k, v in norms.items()}, "seconds": sec, "lam": self.bank.lam}
            rec = L.commit(plan.kind, readd=plan.readd, remove=plan.remove, target=plan.target, info=info,
                           snapshot=self._snapshot_if_due(L.last_step + 1))
            sec["commit"] = time.perf_counter() - t
        return rec

    def verify(self, tol: float = 1e-8) -> VerifyReport:
        return verify(self.bank, self.open(), tol)

    def in_force(self) -> list[FactRow]:
        return self.open().in_force()

