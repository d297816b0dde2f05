"""``fit``: how well a bank's weights meet the stored constraints of the facts in force, by the step
that wrote them (``seqedit ledger fit``).

Sequential steps of an aligned method reproduce the one-time solution of every fact in force, so
early facts are not overwritten by later ones; but the one-time solution itself has to trade the
facts' constraints against each other and against the preservation term. This report measures that
trade per layer: the unmet share of each constraint (:func:`~seqedit.linalg.fit.unmet_share`),
grouped by the step that added the fact, next to the number of key columns in force and the layer's
key dimension. A share that grows with the number of facts, evenly across ages, says the layer is
full; one that grows with age says something forgets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..bank import LayerBank
from ..linalg.fit import unmet_share
from .store import Ledger, LedgerError

__all__ = ["FitReport", "constraint_fit"]


@dataclass
class FitReport:
    """``layers[ℓ]``: ``d_in``, ``columns`` (key columns in force), ``median`` / ``mean`` unmet share over
    them, and ``by_step``: ``[{"steps": [first, last], "facts": n, "median": …, "mean": …}]``, one entry
    per group of consecutive writing steps (oldest first)."""

    n_facts: int
    steps: int
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = {str(k): v for k, v in self.layers.items()}
        return d


def constraint_fit(bank: LayerBank, ledger: Ledger, groups: int = 10, at_step: int | None = None) -> FitReport:
    """Unmet shares of the facts in force under ``bank``'s live masters, in at most ``groups`` groups of
    the steps that wrote them (each fact's columns counted with it). With ``at_step`` (exact forms
    only), the facts in force right after that step under the weights the ledger had then: their
    one-time solution, which is what the sequential steps produced."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    last = ledger.last_step
    if at_step is not None and not 1 <= at_step <= last:
        raise LedgerError(f"ledger {ledger.path} has steps 1..{last}; no step {at_step} to measure the fit after")
    past = at_step is not None and at_step < last
    if past and not bank.capabilities.exact:
        raise LedgerError(f"{bank.spec.label} does not keep the one-time solution of the facts in force, so the "
                          f"weights after step {at_step} cannot be re-solved from the ledger; measure the fit "
                          "after the last step")
    rows = ledger.in_force_after(at_step) if past else ledger.in_force()
    rep = FitReport(len(rows), at_step if past else last)
    if not rows:
        return rep
    kv = ledger.kv(rows, bank.layers)
    width = {s: ledger.kv_width(s) for s in {r.kv_step for r in rows}}
    step_of_col = torch.tensor([r.kv_step for r in rows for _ in range(width[r.kv_step])])
    written = sorted(set(step_of_col.tolist()))
    per = -(-len(written) // groups)
    bins = [written[i : i + per] for i in range(0, len(written), per)]
    for l in bank.layers:
        K, V = kv[l]
        W = bank.one_time(l, K, V)[1] if past else bank.master[l]
        share = unmet_share(W.cpu(), bank.w0[l].cpu(), K, V)
        entry: dict[str, Any] = {"d_in": int(K.shape[0]), "columns": int(K.shape[1]), **_summary(share), "by_step": []}
        for b in bins:
            mask = (step_of_col >= b[0]) & (step_of_col <= b[-1])
            facts = sum(1 for r in rows if b[0] <= r.kv_step <= b[-1])
            entry["by_step"].append({"steps": [b[0], b[-1]], "facts": facts, **_summary(share[mask])})
        rep.layers[l] = entry
    return rep


def _summary(share: torch.Tensor) -> dict[str, float]:
    return {"median": float(share.median()), "mean": float(share.mean())}
