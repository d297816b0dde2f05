"""The one per-layer loop of every step that writes constraints: an edit, ``apply_kv`` and a rekey.

A step visits its edited layers in ascending order. At layer ℓ_i it asks its *column source* for the
keys ``K: [d_in, n]`` and the targets of its columns, read after the layers below were written (an
edit reads them on the model; ``apply_kv`` was given them; a rekey re-reads them), solves, and writes
the layer before the next one is read. What differs between the callers is only where keys and
targets come from (the source), whether the solve updates the current system or starts from W₀
(``from_base``: a rekey is the one-time solve of the facts in force), and whether the columns are
journalled (a :class:`~seqedit.ledger.session.LedgerSession`, which then commits the step around
this loop).

Every path executes the same float operations: targets are made absolute on the current master
(``V = W K + R`` when a source gives residuals), rounded to the ledger's storage dtype when there is a
ledger, and solved as ``bank.update(ℓ, K, V, K_removed, V_removed)``. With float64 storage a ledger
and a ledger-free step are therefore bitwise equal (``tests/unit/test_step_engine.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .bank import LayerBank
from .ledger.session import Constraints, LedgerSession
from .progress import Phase, ProgressCallback, ProgressEvent, emit

__all__ = ["ColumnSource", "LayerPass", "solve_layers"]

# (position i of the layer in the step, layer) -> (K: [d_in, n], R: [d_out, n] residuals on the current
# weights, or None, V: [d_out, n] absolute targets, or None); exactly one of R and V is given
ColumnSource = Callable[[int, int], tuple[Tensor, Tensor | None, Tensor | None]]


@dataclass
class LayerPass:
    """What :func:`solve_layers` did: ``deltas[ℓ]`` the update written (``[d_out, d_in]`` float64),
    ``constraints[ℓ] = (K, V)`` the columns as stored (with a ledger; else empty), and the seconds spent
    reading columns (``keys``), solving and writing."""

    deltas: dict[int, Tensor] = field(default_factory=dict)
    constraints: Constraints = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"keys": 0.0, "solve": 0.0, "apply": 0.0})

    @property
    def update_norms(self) -> dict[int, float]:
        """‖Δ_ℓ‖_F per layer."""
        return {layer: float(d.norm()) for layer, d in self.deltas.items()}


def solve_layers(bank: LayerBank, session: LedgerSession | None, layers: Sequence[int], source: ColumnSource, *,
                 removed: Constraints | None = None, from_base: bool = False,
                 progress: ProgressCallback | None = None, message: str | None = None) -> LayerPass:
    """Solve and write ``layers`` in order from ``source`` (module docstring). ``removed[ℓ] = (K, V)`` are
    the stored columns the step takes out (exact-removal forms); ``from_base`` replaces each layer's state
    by the one-time solve from W₀ of the columns (the bank's layers must already be at W₀). Runs inside
    the caller's ``bank.transaction()``: an error leaves it to roll the bank back."""
    out = LayerPass()
    emit(progress, ProgressEvent(Phase.LAYERS, total=len(layers), start=True, message=message))
    for i, layer in enumerate(layers):
        t = time.perf_counter()
        K, R, V = source(i, layer)
        out.seconds["keys"] += time.perf_counter() - t
        if (R is None) == (V is None):
            raise ValueError(f"the column source of layer {layer} must give exactly one of residuals and targets")
        t = time.perf_counter()
        W = bank.master[layer]
        K = K.to(W.device, torch.float64)
        V = W @ K + R.to(W.device, torch.float64) if V is None else V.to(W.device, torch.float64)
        if session is not None:  # what is solved is what is stored, so that a replay repeats it bit for bit
            Ks, Vs = session.round_kv(K, V)
            out.constraints[layer] = (Ks, Vs)
            K, V = Ks.double(), Vs.double()
        if from_base:
            state, W_new = bank.one_time(layer, K, V)
            delta = W_new - bank.master[layer].to(W_new.device)
        else:
            Kr, Vr = removed[layer] if removed else (None, None)
            delta = bank.update(layer, K, V, Kr, Vr)
        out.seconds["solve"] += time.perf_counter() - t
        t = time.perf_counter()
        if from_base:
            bank.replace(layer, state, W_new)
        else:
            bank.write(layer, delta)
        out.deltas[layer] = delta
        out.seconds["apply"] += time.perf_counter() - t
        emit(progress, ProgressEvent(Phase.LAYERS, advance=1, total=len(layers)))
    return out
