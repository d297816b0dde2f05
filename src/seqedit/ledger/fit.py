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
from typing import Any, Callable, Sequence

import torch

from ..bank import LayerBank
from ..linalg.fit import unmet_share
from ..facts import Fact
from .columns import column_groups
from .store import FactRow, Ledger, LedgerError

__all__ = ["FitReport", "KeyReread", "constraint_fit", "key_drift"]

# re-reads the keys of ``facts`` on the current model in prompt format ``fmt``: {layer: [d_in, n·c]},
# c key columns per fact (one per format when ``split``)
KeyReread = Callable[[Sequence[Fact], str, bool], dict[int, torch.Tensor]]


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
    bins = _step_bins(ledger, rows, groups)
    for l in bank.layers:
        K, V = kv[l]
        W = bank.one_time(l, K, V)[1] if past else bank.master[l]
        share = unmet_share(W.cpu(), bank.w0[l].cpu(), K, V)
        entry: dict[str, Any] = {"d_in": int(K.shape[0]), "columns": int(K.shape[1]), **_summary(share), "by_step": []}
        for steps, facts, mask in bins:
            entry["by_step"].append({"steps": steps, "facts": facts, **_summary(share[mask])})
        rep.layers[l] = entry
    return rep


def key_drift(bank: LayerBank, ledger: Ledger, reread: KeyReread, groups: int = 10) -> FitReport:
    """How far the keys the model computes now for the facts in force are from the keys their
    constraints hold (read when each fact was edited, before later steps changed the layers below).

    Per layer: ``median`` / ``mean`` of the relative key change ‖k_now − k‖ / ‖k‖ over the key columns,
    ``unmet_now`` (median of ‖W k_now − v‖ / ‖v − W₀ k‖: the layer's output for the key it really
    sees, against the stored target, over what the constraint asked) next to ``unmet_stored`` (the same
    with the stored key, as :func:`constraint_fit`), and ``by_step`` as there. The facts of the last
    step read their keys on final lower layers, so their change is rounding only."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    rows = ledger.in_force()
    rep = FitReport(len(rows), ledger.last_step)
    if not rows:
        return rep
    kv = ledger.kv(rows, bank.layers)
    # one re-read per (format, columns) group of rows, scattered back into row order
    now: dict[int, torch.Tensor] = {l: torch.empty_like(kv[l][0]) for l in bank.layers}
    for fmt, width, idx, cols in column_groups(ledger, rows):
        keys = reread([rows[i].fact for i in idx], fmt, width > 1)
        for l in bank.layers:
            now[l][:, cols] = keys[l].to(torch.float64).cpu()
    bins = _step_bins(ledger, rows, groups)
    for l in bank.layers:
        K, V = kv[l]
        W, W0 = bank.master[l].cpu().to(torch.float64), bank.w0[l].cpu().to(torch.float64)
        rel = (now[l] - K).norm(dim=0) / K.norm(dim=0).clamp(min=1e-30)
        asked = (V - W0 @ K).norm(dim=0)
        unmet_now = (W @ now[l] - V).norm(dim=0) / asked
        unmet_stored = unmet_share(W, W0, K, V)
        entry: dict[str, Any] = {"d_in": int(K.shape[0]), "columns": int(K.shape[1]), **_summary(rel),
                                 "unmet_now": float(unmet_now.median()), "unmet_stored": float(unmet_stored.median()),
                                 "by_step": []}
        for steps, facts, mask in bins:
            entry["by_step"].append({"steps": steps, "facts": facts,
                                     **_summary(rel[mask]), "unmet_now": float(unmet_now[mask].median()),
                                     "unmet_stored": float(unmet_stored[mask].median())})
        rep.layers[l] = entry
    return rep


def _step_bins(ledger: Ledger, rows: Sequence[FactRow], groups: int) -> list[tuple[list[int], int, torch.Tensor]]:
    """The writing steps of ``rows`` in at most ``groups`` runs of consecutive steps: per run
    ``([first, last], facts, mask)``, ``mask`` selecting its columns in :meth:`Ledger.kv`'s layout. A rekey
    step writes every fact in force, so ages count from the last one."""
    width = {s: ledger.kv_width(s) for s in {r.kv_step for r in rows}}
    step_of_col = torch.tensor([r.kv_step for r in rows for _ in range(width[r.kv_step])])
    written = sorted(width)
    per = -(-len(written) // groups)
    out = []
    for i in range(0, len(written), per):
        lo, hi = written[i], written[min(i + per, len(written)) - 1]
        facts = sum(1 for r in rows if lo <= r.kv_step <= hi)
        out.append(([lo, hi], facts, (step_of_col >= lo) & (step_of_col <= hi)))
    return out


def _summary(share: torch.Tensor) -> dict[str, float]:
    return {"median": float(share.median()), "mean": float(share.mean())}
