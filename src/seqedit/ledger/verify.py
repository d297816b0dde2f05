"""``verify``: re-solve the one-time problem of the facts in force and compare with a bank's weights."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..bank import LayerBank
from .store import Ledger

__all__ = ["VerifyReport", "verify"]


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = {str(k): v for k, v in self.layers.items()}
        d["bad_files"] = [list(b) for b in self.bad_files]
        return d


def verify(bank: LayerBank, ledger: Ledger, tol: float = 1e-8) -> VerifyReport:
    """Re-solve the one-time problem from the stored (k, v) of the facts in force and the base
    weights, compare with ``bank``'s live weights per layer, and check every file's checksum."""
    t0 = time.perf_counter()
    bad = ledger.check_files()
    rows = ledger.in_force()
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
    ok = not bad and all(e["deployed_matches"] and (e["rel_error"] is None or e["rel_error"] <= tol)
                         for e in layers.values())
    return VerifyReport(ok, tol, bank.spec.label, caps.exact, len(rows), ledger.last_step, ledger.file_count(),
                        bad, layers, time.perf_counter() - t0)
