"""The carried error of Algorithm 1 (REFERENCE_NOTES §2.6): ``ErrorCompensation`` keeps ``W_{t−1} + Δ_t``
equal to the one-time solution of all constraints whatever the post-processor R_p does to each step.

Pure float64 tensors in and out (on the system's device); nothing here knows about models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from seqedit.linalg.checks import count, matrix, require
from seqedit.linalg.normal_eq import LayerSystem
from seqedit.linalg.postprocess import PostProcessor

__all__ = ["ErrorCompensation"]


class ErrorCompensation:
    """The carried error ``E: [d_out, d_in]`` of Algorithm 1 (REFERENCE_NOTES §2.6), ``E_0 = 0``.

    Each ``step`` solves ``Δ_t = (R_t K_tᵀ − E_{t−1}) A_t⁻¹`` (``A_t`` = the ``LayerSystem`` after adding
    ``K_t``), deploys ``R_p(Δ_t)`` and sets ``E_t = (R_p(Δ_t) − Δ_t) A_t``. Invariant, for any
    post-processor and residuals ``R_t = V_t − W_{t−1} K_t`` on the **deployed** weight: ``W_{t−1} + Δ_t``
    equals the one-time (unprocessed) solution of all constraints so far, so the deployed weight
    differs from it only by the last step's ``R_p(Δ_t) − Δ_t``. ``E`` is overwritten, not accumulated:
    each step cancels the previous distortion. ``E`` is stored only when non-zero, so a post-processor
    that changes nothing (PRUNE, nearly always) costs neither the full-width solve nor the
    d_out·d_in² product.
    """

    def __init__(self, d_out: int, d_in: int, *, device: torch.device | str | None = None) -> None:
        self._d_out, self._d_in = count(d_out, "d_out"), count(d_in, "d_in")
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._E: Tensor | None = None

    @property
    def E(self) -> Tensor:
        """``[d_out, d_in]`` float64 (zeros until a step distorts). Read-only."""
        if self._E is None:
            return torch.zeros(self._d_out, self._d_in, dtype=torch.float64, device=self._device)
        return self._E

    @property
    def is_zero(self) -> bool:
        """True while ``E = 0`` exactly (no step so far, or the last post-processor changed nothing)."""
        return self._E is None

    @property
    def d_out(self) -> int:
        return self._d_out

    @property
    def d_in(self) -> int:
        return self._d_in

    def __repr__(self) -> str:
        return f"ErrorCompensation(d_out={self._d_out}, d_in={self._d_in}, is_zero={self.is_zero})"

    def step(
        self, system: LayerSystem, K: Tensor, R: Tensor, W: Tensor, post: PostProcessor, *, low_rank: bool = False
    ) -> tuple[Tensor, Tensor]:
        """One step: add ``K: [d_in, n]`` to ``system`` and return ``(R_p(Δ_t), Δ_t)``, both ``[d_out, d_in]``.

        ``R: [d_out, n]`` are residuals on the deployed weight ``W: [d_out, d_in]``; the caller deploys
        ``W + R_p(Δ_t)``. ``post(Δ_t, W)`` is called exactly once, and its result serves both the
        deployed update and ``E_t``. With ``low_rank=True``, ``post`` also takes ``low_rank=(U, X)``
        (``Δ_t = U Xᵀ``), passed while ``E = 0`` (then ``Δ_t`` has rank ≤ n; otherwise ``None``).
        Transactional: if validation, the system update or ``post`` fails (or ``post`` returns a wrong
        shape or non-finite values), ``system`` and ``E`` are unchanged.
        """
        if not isinstance(system, LayerSystem):
            raise ValueError(f"system must be a LayerSystem, got {type(system).__name__}")
        if system.d_in != self._d_in:
            raise ValueError(f"system has d_in={system.d_in}, this ErrorCompensation d_in={self._d_in}")
        if not callable(post):
            raise ValueError(f"post must be callable (Δ, W) -> Δ, got {type(post).__name__}")
        dev = system.device
        K = matrix(K, "K", self._d_in, None, dev)
        R = matrix(R, "R", self._d_out, K.shape[1], dev)
        W = matrix(W, "W", self._d_out, self._d_in, dev)
        snapshot = system.copy()
        try:
            U, X = system.update_factors(K, R)
            raw = U @ X.mT
            factors = (U, X) if self._E is None else None
            if self._E is not None:
                raw = raw - system.solve_right(self._E.to(dev))
            out = post(raw, W, low_rank=factors) if low_rank else post(raw, W)
            applied = matrix(out, "post(Δ, W)", self._d_out, self._d_in, dev)
        except BaseException:
            # LayerSystem replaces its tensors and never mutates them, so the attributes of a copy()
            # taken before the update are exactly the prior state.
            system.__dict__.update(snapshot.__dict__)
            raise
        self._E = None if torch.equal(applied, raw) else (applied - raw) @ system.A
        self._device = dev
        return applied, raw

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """``d_out``, ``d_in`` and, only when non-zero, ``E``."""
        state: dict[str, Any] = {"d_out": self._d_out, "d_in": self._d_in}
        if self._E is not None:
            state["E"] = self._E.contiguous()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, device: torch.device | str | None = None) -> ErrorCompensation:
        """Rebuild from ``state_dict()`` output; ``device`` defaults to that of the stored ``E``."""
        require(state, ("d_out", "d_in"), "ErrorCompensation")
        E = state.get("E")
        if device is None and isinstance(E, Tensor):
            device = E.device
        self = cls(state["d_out"], state["d_in"], device=device)
        if E is not None:
            self._E = matrix(E, "state['E']", self._d_out, self._d_in, self._device)
        return self
