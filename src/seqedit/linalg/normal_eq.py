"""Normal equations of one edited layer (DESIGN §2).

For a layer ``y = W k`` with ``W: [d_out, d_in]`` the weights after any sequence of steps solve
``(W − W₀) A = B`` with ``A = λΣ₀ + ρI + Σ_f k_f k_fᵀ`` over the facts ``f`` in force. A step that adds
the keys ``K_add`` and removes ``K_remove`` moves ``W`` by the exact difference of the two optima,

    Δ = [R_add | −R_remove] · (A_new⁻¹ [K_add | K_remove])ᵀ,   r = v − W k on the current W,

so ``LayerSystem`` only needs ``A`` (and its factorisation), never ``B`` or ``W``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from seqedit.linalg.checks import count, device_of, matrix, real, require, square, symmetric
from seqedit.linalg.solvers import (
    SINGULAR_COND,
    check_condition,
    cho_solve,
    cholesky_factor,
    inverse_from_factor,
    woodbury_downdate,
    woodbury_solve,
    woodbury_update,
)
from seqedit.linalg.system_base import GramSystem, hinted

__all__ = ["SOLVERS", "ConditioningWarning", "LayerSystem"]

SOLVERS = ("cholesky", "woodbury")


class ConditioningWarning(UserWarning):
    """The condition estimate of a layer's ``A`` exceeds ``cond_warn``; answers lose accuracy."""


_A_NAME = "A = λΣ₀ + ρI + Σ k kᵀ"


def _is_inf(x: Any) -> bool:
    try:
        return float(x) == math.inf
    except (TypeError, ValueError):
        return False


class LayerSystem(GramSystem):
    """``A = λΣ₀ + ρI + Σ_f k_f k_fᵀ: [d_in, d_in]`` in float64 with its factorisation.

    Invariants: ``A`` is symmetric positive definite and kept explicitly; on the ``"cholesky"`` path
    its lower factor ``L`` is current; on the ``"woodbury"`` path ``C ≈ A⁻¹`` is carried by rank-n
    updates and recomputed from a fresh Cholesky of ``A`` every ``reanchor_every`` updates. Every
    factorisation (each update on the Cholesky path, each anchor on the Woodbury path) checks the
    condition estimate: above ``SINGULAR_COND`` it raises, above ``cond_warn`` it warns. Tensors
    are replaced, never modified in place, so ``A``, ``state_dict()`` and ``copy()`` share them safely;
    callers must not modify them in place either.
    """

    def __init__(
        self,
        sigma0: Tensor,
        lam: float,
        ridge: float = 0.0,
        *,
        solver: str = "cholesky",
        reanchor_every: int = 32,
        cond_warn: float = 1e12,
        device: torch.device | str | None = None,
    ) -> None:
        """Build ``A = lam·sigma0 + ridge·I`` (``sigma0: [d_in, d_in]`` symmetric PSD) and factorise it.

        Raises ``ValueError`` for invalid arguments and ``IllConditionedError`` if ``A`` is singular.
        """
        self._configure(lam, ridge, solver, reanchor_every, cond_warn)
        S = symmetric(sigma0, "sigma0", device_of(device, sigma0))
        A = self._lam * S + self._ridge * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
        self._n = 0
        self._install(A, self._factor(A, "raise lam or add a ridge (ridge > 0)"))

    def _configure(self, lam: float, ridge: float, solver: str, reanchor_every: int, cond_warn: float) -> None:
        self._lam = real(lam, "lam")
        self._ridge = real(ridge, "ridge")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
        self._solver = solver
        self._reanchor_every = count(reanchor_every, "reanchor_every")
        # inf is the documented way to disable the warning, and the only non-finite value accepted.
        self._cond_warn = math.inf if _is_inf(cond_warn) else real(cond_warn, "cond_warn", positive=True)

    def _factor(self, A: Tensor, hint: str) -> Tensor:
        """Cholesky factor of ``A``; raises if (numerically) singular, warns if ill-conditioned."""
        d = A.shape[0]
        with hinted(hint):
            L = cholesky_factor(A, name=_A_NAME)
            cond = check_condition(L, SINGULAR_COND, name=_A_NAME)
        if cond > self._cond_warn:
            warnings.warn(
                f"A ({d}×{d}) has condition estimate {cond:.3g} > cond_warn={self._cond_warn:.3g}; "
                "edits lose accuracy; consider a larger lam or a ridge",
                ConditioningWarning,
                stacklevel=3,
            )
        return L

    def _install(self, A: Tensor, L: Tensor) -> None:
        """Make ``A`` (with its fresh factor ``L``) current; on the Woodbury path this is an anchor."""
        self._A = A
        self._since_anchor = 0
        if self._solver == "cholesky":
            self._L: Tensor | None = L
            self._C: Tensor | None = None
        else:
            self._L = None
            self._C = inverse_from_factor(L)

    # ------------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        return self._A.shape[0]

    @property
    def A(self) -> Tensor:
        """``A: [d_in, d_in]`` float64. Read-only: do not modify in place."""
        return self._A

    @property
    def ridge(self) -> float:
        return self._ridge

    @property
    def lam(self) -> float:
        """The preservation weight λ of ``λΣ₀`` in ``A``."""
        return self._lam

    @property
    def solver(self) -> str:
        return self._solver

    @property
    def device(self) -> torch.device:
        return self._A.device

    def __repr__(self) -> str:
        return (
            f"LayerSystem(d_in={self.d_in}, n_constraints={self._n}, lam={self._lam:g}, "
            f"ridge={self._ridge:g}, solver={self._solver!r})"
        )

    # ------------------------------------------------------------------ operations
    def update(
        self,
        K_add: Tensor | None,
        R_add: Tensor | None,
        K_remove: Tensor | None = None,
        R_remove: Tensor | None = None,
    ) -> Tensor:
        """Set ``A ← A + K_add K_addᵀ − K_remove K_removeᵀ`` and return ``Δ: [d_out, d_in]`` (float64).

        ``K_add: [d_in, n]``, ``R_add: [d_out, n]``, ``K_remove: [d_in, m]``, ``R_remove: [d_out, m]``,
        with residuals ``r = v − W k`` on the current ``W``; ``W + Δ`` is the new optimum.
        Transactional: on any error (``ValueError`` for bad inputs, ``IllConditionedError`` if the new
        ``A`` is not positive definite) the state is unchanged.
        """
        U, X = self.update_factors(K_add, R_add, K_remove, R_remove)
        return U @ X.mT

    def update_factors(
        self,
        K_add: Tensor | None,
        R_add: Tensor | None,
        K_remove: Tensor | None = None,
        R_remove: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`update`, returning ``Δ`` as its factors ``(U: [d_out, n+m], X: [d_in, n+m])``,
        ``Δ = U Xᵀ`` (rank ≤ n + m): what PRUNE needs to find Δ's singular values without an SVD of Δ."""
        step = self._prepare(self._A, K_add, R_add, K_remove, R_remove)
        if step.empty:
            return step.R, torch.zeros(self.d_in, 0, dtype=torch.float64, device=self.device)
        hint = step.hint("A")
        # Only the factorisation / capacitance solves can fail, and they run before any commit.
        if self._solver == "cholesky" or self._since_anchor + 1 >= self._reanchor_every:
            self._install(step.gram, self._factor(step.gram, hint))
        else:
            assert self._C is not None
            with hinted(hint):
                C_new = woodbury_downdate(woodbury_update(self._C, step.added), step.removed)
            self._A, self._C = step.gram, C_new
            self._since_anchor += 1
        self._n = step.n_constraints
        return step.R, self._solve(step.K)

    def with_lam(self, lam: float, sigma0: Tensor, W_delta: Tensor) -> tuple[LayerSystem, Tensor]:
        """The same constraints under preservation weight ``lam``: ``A' = A + (λ' − λ)Σ₀``, and the move
        ``Δ: [d_out, d_in]`` of the optimum, given ``W_delta = W − W₀: [d_out, d_in]`` at the current one.

        Exact: from ``(W − W₀)A = B`` and ``(W' − W₀)A' = B``, ``Δ = W' − W = −(λ' − λ)(W − W₀)Σ₀A'⁻¹``,
        so ``W + Δ`` is the one-time solution of the same constraints with ``λ'``. ``sigma0`` must be the
        ``Σ₀: [d_in, d_in]`` this system was built with. The new system is a fresh anchor (on the
        Woodbury path ``C = A'⁻¹`` from its Cholesky); ``self`` is unchanged, also on error
        (``IllConditionedError`` if ``A'`` is not positive definite).
        """
        lam = real(lam, "lam")
        S = symmetric(sigma0, "sigma0", self.device)
        if S.shape[0] != self.d_in:
            raise ValueError(f"sigma0 is {S.shape[0]}×{S.shape[0]}, this system is {self.d_in}×{self.d_in}")
        D = matrix(W_delta, "W_delta", None, self.d_in, self.device)
        new, shift = self.copy(), lam - self._lam
        if not shift:  # the same system: no factorisation to redo, no move
            return new, torch.zeros_like(D)
        A = self._A + shift * S
        new._lam = lam
        new._install(A, new._factor(A, "a smaller lam leaves A singular: keep lam larger or add a ridge"))
        return new, (-shift) * new.solve_right(D @ S)

    def _solve(self, X: Tensor) -> Tensor:
        """``A⁻¹ X`` for ``X: [d_in, m]``."""
        if self._L is not None:
            return cho_solve(self._L, X)
        assert self._C is not None
        return woodbury_solve(self._A, self._C, X)

    def solve_right(self, B: Tensor) -> Tensor:
        """``B A⁻¹: [m, d_in]`` for ``B: [m, d_in]`` (float64)."""
        return self._solve(matrix(B, "B", None, self.d_in, self.device).mT).mT

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Contiguous tensors, floats, ints and strs; ``from_state_dict`` restores an identical system.

        The Woodbury path also stores ``C``: it carries the rounding of the updates since the last
        anchor, and recomputing it would change later answers in the last bits.
        """
        state: dict[str, Any] = {
            "A": self._A.contiguous(),
            "lam": self._lam,
            "ridge": self._ridge,
            "solver": self._solver,
            "reanchor_every": self._reanchor_every,
            "cond_warn": self._cond_warn,
            "n_constraints": self._n,
            "since_anchor": self._since_anchor,
        }
        if self._C is not None:
            state["C"] = self._C.contiguous()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, device: torch.device | str | None = None) -> LayerSystem:
        """Rebuild a system from ``state_dict()`` output, optionally on another ``device``."""
        required = ("A", "lam", "ridge", "solver", "reanchor_every", "cond_warn", "n_constraints", "since_anchor")
        require(state, required, "LayerSystem")
        self = cls.__new__(cls)
        self._configure(state["lam"], state["ridge"], state["solver"], state["reanchor_every"], state["cond_warn"])
        A = square(state["A"], "state['A']", device_of(device, state["A"]))
        self._restore_count(state)
        if self._solver == "cholesky":
            self._install(A, self._factor(A, "the stored A is corrupt"))
        else:
            if "C" not in state:
                raise ValueError("LayerSystem state for the woodbury solver is missing 'C'")
            self._A = A
            self._L = None
            self._C = matrix(state["C"], "state['C']", A.shape[0], A.shape[0], A.device)
            self._since_anchor = int(state["since_anchor"])
            if not 0 <= self._since_anchor < self._reanchor_every:
                raise ValueError(
                    f"state['since_anchor'] must be in [0, {self._reanchor_every}), got {self._since_anchor}"
                )
        return self
