"""``verify``: re-solve the one-time problem of the facts in force and compare with a bank's weights."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..bank import LayerBank
from .journal import DB_NAME, LedgerError
from .store import Ledger

__all__ = ["VerifyReport", "check_files", "unreadable", "verify"]


@dataclass
class VerifyReport:
    """``layers[ℓ]``: ``rel_error`` = ‖W_live − W_OTE‖_F / ‖W_OTE − W₀‖_F (``None`` for methods whose
    weights are not a one-time solution) and ``deployed_matches`` (the model holds the float64 master
    cast to its dtype). ``bad_files``: (name, problem). ``ok`` when all pass with ``rel_error ≤ tol``."""

    ok: bool
    tol: float
    method: str
    exact: bool
    n_facts: int
    steps: int
    files_checked: int
    bad_files: list[tuple[str, str]]
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def problems(self) -> list[tuple[str, str]]:
        """Every failed check as ``(what, problem)``: bad files, then layers, in one list."""
        out = list(self.bad_files)
        for l, e in self.layers.items():
            if not e["deployed_matches"]:
                out.append((f"layer {l}", "the model's weight is not the float64 master cast to its dtype"))
            if e["rel_error"] is not None and not e["rel_error"] <= self.tol:
                out.append((f"layer {l}", f"relative error {e['rel_error']:.3g} > tolerance {self.tol:g}"))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = {str(k): v for k, v in self.layers.items()}
        d["bad_files"] = [list(b) for b in self.bad_files]
        d["problems"] = [{"what": w, "problem": p} for w, p in self.problems()]
        return d


def check_files(ledger: Ledger, tol: float = 1e-8) -> VerifyReport:
    """The model-free part of :func:`verify` on a ledger opened read-only: the journal's pages and
    digest and every file's checksum. ``layers`` stays empty; ``ok`` only if nothing is bad (the
    weights still need :func:`verify`). Damage is reported, never raised."""
    t0 = time.perf_counter()
    bad = ledger.check_files()
    try:
        n_facts, steps = ledger.count_in_force(), ledger.last_step
    except LedgerError as e:
        n_facts, steps = 0, 0
        if not bad:
            bad = [(DB_NAME, str(e))]
    try:
        count = ledger.file_count()
    except LedgerError:
        count = 0
    method = ledger.manifest.get("method_label", "?")
    return VerifyReport(not bad, tol, str(method), False, n_facts, steps, count, bad, {}, time.perf_counter() - t0)


def unreadable(path: Any, problem: str, tol: float) -> VerifyReport:
    """The report on a ledger whose journal cannot even be opened."""
    return VerifyReport(False, tol, "?", False, 0, 0, 0, [(DB_NAME, problem)], {})


def verify(bank: LayerBank, ledger: Ledger, tol: float = 1e-8) -> VerifyReport:
    """Re-solve the one-time problem from the stored (k, v) of the facts in force and the base
    weights, compare with ``bank``'s live weights per layer, and check every file's checksum."""
    t0 = time.perf_counter()
    bad = ledger.check_files()
    rows = ledger.in_force_columns()  # the facts themselves are the hash chain's to vouch for
    caps = bank.capabilities
    kv = ledger.kv(rows, bank.layers) if caps.exact and not bad else {}
    layers: dict[int, dict[str, Any]] = {}
    for l in bank.layers:
        entry: dict[str, Any] = {"deployed_matches": bank.deployed_matches(l)}
        if kv:
            _, W_ote = bank.one_time(l, *kv[l])
            scale = float((W_ote - bank.w0[l]).norm()) or float(bank.w0[l].norm())
            entry["rel_error"] = float((bank.master[l] - W_ote).norm()) / scale
        else:
            entry["rel_error"] = None
        layers[l] = entry
    rep = VerifyReport(False, tol, bank.spec.label, caps.exact, len(rows), ledger.last_step, ledger.file_count(),
                       bad, layers, time.perf_counter() - t0)
    rep.ok = not rep.problems()
    return rep
