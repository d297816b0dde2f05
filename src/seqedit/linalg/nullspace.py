"""AlphaEdit's operators (REFERENCE_NOTES §2.4, §5.3.9): ``NullSpace``, the approximate null space of
Σ₀, and ``AlphaEditSystem``, AlphaEdit's update restricted to it and solved in reduced r×r coordinates.

Pure float64 tensors in and out (on the inputs' device); nothing here knows about models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from seqedit.linalg.checks import device_of, matrix, real, require, symmetric
from seqedit.linalg.solvers import SINGULAR_COND, cho_solve, cholesky_factor
from seqedit.linalg.system_base import GramSystem, hinted

__all__ = ["AlphaEditSystem", "NullSpace"]


class NullSpace:
    """Approximate null space of Σ₀: ``U0: [d, r]``, the eigenvectors of Σ₀ with eigenvalue < threshold.

    Invariants: the columns of ``U0`` are orthonormal; ``eigenvalues: [r]`` holds their eigenvalues,
    ascending and all < ``threshold``. The projector ``P = U0 U0ᵀ`` is never formed: at d = 14336 it
    would take 1.6 GB in float64, and ``P X = U0 (U0ᵀ X)`` costs O(d·r·m) instead of O(d²·m).
    Tensors are never modified in place.
    """

    def __init__(self, U0: Tensor, eigenvalues: Tensor, threshold: float) -> None:
        """Wrap an existing basis; see ``from_sigma0`` for the usual construction.

        ``U0: [d, r]`` (orthonormal columns: not checked, that would cost O(d·r²)),
        ``eigenvalues: [r]`` (each < ``threshold``), ``threshold > 0``.
        """
        self._threshold = real(threshold, "threshold", positive=True)
        U0 = matrix(U0, "U0")
        if U0.shape[0] == 0 or U0.shape[1] > U0.shape[0]:
            raise ValueError(f"U0 must be [d, r] with 1 ≤ d and r ≤ d, got shape {tuple(U0.shape)}")
        if not isinstance(eigenvalues, Tensor) or eigenvalues.shape != (U0.shape[1],):
            got = tuple(eigenvalues.shape) if isinstance(eigenvalues, Tensor) else type(eigenvalues).__name__
            raise ValueError(f"eigenvalues must be a tensor of shape [{U0.shape[1]}] (one per column of U0), got {got}")
        ev = eigenvalues.to(device=U0.device, dtype=torch.float64)
        if not torch.isfinite(ev).all():
            raise ValueError("eigenvalues contain NaN or infinite entries")
        if ev.numel() and ev.max().item() >= self._threshold:
            raise ValueError(f"eigenvalues must all be < threshold={self._threshold:g}, got max {ev.max().item():.3g}")
        self._U0 = U0
        self._eigenvalues = ev

    @classmethod
    def from_sigma0(
        cls, sigma0: Tensor, threshold: float = 2e-2, *, device: torch.device | str | None = None
    ) -> NullSpace:
        """Null space of the **un-scaled** ``sigma0: [d, d]`` (symmetric PSD), as the reference does.

        One float64 ``torch.linalg.eigh`` (on ``sigma0``'s device unless ``device`` is given): Σ₀ is
        symmetric, so its eigendecomposition is its SVD at a fraction of the cost. Keeps the ``r``
        eigenvectors with eigenvalue < ``threshold`` (``r`` may be 0). Raises ``ValueError`` for a
        threshold ≤ 0 or a ``sigma0`` that is not a finite symmetric square matrix.
        """
        thr = real(threshold, "threshold", positive=True)
        evals, Q = torch.linalg.eigh(symmetric(sigma0, "sigma0", device_of(device, sigma0)))
        r = int((evals < thr).sum().item())
        # eigh sorts ascending, so the null space is the leading block; cloning it lets the d×d Q go.
        return cls(Q[:, :r].clone(memory_format=torch.contiguous_format), evals[:r].clone(), thr)

    @property
    def U0(self) -> Tensor:
        """``[d, r]`` float64, orthonormal columns. Read-only."""
        return self._U0

    @property
    def eigenvalues(self) -> Tensor:
        """``[r]`` float64: the eigenvalue of Σ₀ for each column of ``U0``, ascending. Read-only."""
        return self._eigenvalues

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def d(self) -> int:
        return self._U0.shape[0]

    @property
    def r(self) -> int:
        """Dimension of the null space (number of eigenvalues < threshold)."""
        return self._U0.shape[1]

    @property
    def device(self) -> torch.device:
        return self._U0.device

    def __repr__(self) -> str:
        return f"NullSpace(d={self.d}, r={self.r}, threshold={self._threshold:g})"

    def state_dict(self) -> dict[str, Any]:
        """``U0: [d, r]``, ``eigenvalues: [r]`` (contiguous) and ``threshold``."""
        return {
            "U0": self._U0.contiguous(),
            "eigenvalues": self._eigenvalues.contiguous(),
            "threshold": self._threshold,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, device: torch.device | str | None = None) -> NullSpace:
        """Rebuild from ``state_dict()`` output, optionally moving the tensors to ``device``."""
        require(state, ("U0", "eigenvalues", "threshold"), "NullSpace")
        U0, ev = state["U0"], state["eigenvalues"]
        if device is not None and isinstance(U0, Tensor) and isinstance(ev, Tensor):
            U0, ev = U0.to(device), ev.to(device)
        return cls(U0, ev, state["threshold"])


class AlphaEditSystem(GramSystem):
    """AlphaEdit's normal equations in the reduced coordinates of a ``NullSpace`` (REFERENCE_NOTES §2.4).

    The full-size reference solves ``(P (K Kᵀ + C) + αI) X = P K Rᵀ``, ``Δ = Xᵀ`` with ``C`` the Gram
    of the edit keys in force. Every solution has ``X = P X``, so ``X = U0 Y`` with the r×r **SPD**
    system ``M Y = U0ᵀ K Rᵀ``, where

        M = U0ᵀ C U0 + U0ᵀ K Kᵀ U0 + αI_r   (+ λ·diag(eigenvalues) if ``full``: Prop. 3.2's λΣ₀P term)

    and ``Δ = (R Kᵀ U0) M⁻¹ U0ᵀ: [d_out, d_in]``. Its rows lie in the null space (``Δ P = Δ``).

    Invariants: ``M: [r, r]`` (``= base + U0ᵀ C U0`` for the keys added minus removed) is kept
    explicitly in float64 with its current Cholesky factor; ``C`` itself (d_in×d_in) is never formed.
    With fixed keys and residuals on the current weight, the sum of the aligned steps equals one
    solve with all keys (α acts as a ridge on the *total* update), so removal is exact too.
    Tensors are replaced, never modified in place.
    """

    def __init__(self, null: NullSpace, alpha: float = 10.0, lam: float = 0.0, full: bool = False) -> None:
        """``alpha > 0`` (the reference's ``L2``); ``lam ≥ 0`` enters only with ``full=True``.

        Raises ``ValueError`` for invalid arguments, including an empty null space (no eigenvalue of
        Σ₀ below the threshold: every update would be 0).
        """
        if not isinstance(null, NullSpace):
            raise ValueError(f"null must be a NullSpace, got {type(null).__name__}")
        if null.r == 0:
            raise ValueError(
                f"the null space is empty (no eigenvalue of Σ₀ below threshold={null.threshold:g}): "
                "every AlphaEdit update would be 0; raise the threshold"
            )
        self._null = null
        self._configure(alpha, lam, full)
        self._n = 0
        base = self._base()
        self._M, self._L = base, self._factor(base, "alpha must be > 0")

    def _configure(self, alpha: float, lam: float, full: bool) -> None:
        # α > 0 is required: M = αI_r + (rank ≤ #keys) is singular without it whenever fewer than r
        # independent keys reach the null space, which is the normal case (r in the thousands).
        self._alpha = real(alpha, "alpha", positive=True)
        self._lam = real(lam, "lam")
        if not isinstance(full, bool):
            raise ValueError(f"full must be a bool, got {full!r}")
        if self._lam != 0 and not full:
            raise ValueError(f"lam={lam!r} has no effect unless full=True (it weights Prop. 3.2's λ·U0ᵀΣ₀U0 term)")
        self._full = full

    def _base(self) -> Tensor:
        """``αI_r (+ λ·diag(eigenvalues))``: the part of ``M`` that does not depend on edit keys."""
        diag = torch.full((self.r,), self._alpha, dtype=torch.float64, device=self.device)
        if self._full:
            # U0ᵀΣ₀U0 = diag(eigenvalues); eigh can return tiny negative eigenvalues of a PSD Σ₀,
            # and λ (up to ~1e4) would turn that rounding into a spurious negative term.
            diag = diag + self._lam * self._null.eigenvalues.clamp(min=0)
        return torch.diag(diag)

    def _factor(self, M: Tensor, hint: str) -> Tensor:
        with hinted(hint):
            return cholesky_factor(M, max_cond=SINGULAR_COND, name=f"reduced AlphaEdit matrix M ({self.r}×{self.r})")

    # ------------------------------------------------------------------ properties
    @property
    def null(self) -> NullSpace:
        return self._null

    @property
    def r(self) -> int:
        return self._null.r

    @property
    def d_in(self) -> int:
        return self._null.d

    @property
    def M(self) -> Tensor:
        """``[r, r]`` float64, the reduced SPD matrix of the keys in force. Read-only."""
        return self._M

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def full(self) -> bool:
        return self._full

    @property
    def device(self) -> torch.device:
        return self._null.device

    def __repr__(self) -> str:
        return (
            f"AlphaEditSystem(d_in={self.d_in}, r={self.r}, n_constraints={self._n}, alpha={self._alpha:g}, "
            f"lam={self._lam:g}, full={self._full})"
        )

    # ------------------------------------------------------------------ operations
    def update(
        self,
        K_add: Tensor | None,
        R_add: Tensor | None,
        K_remove: Tensor | None = None,
        R_remove: Tensor | None = None,
        accumulate: bool = True,
    ) -> Tensor:
        """Return ``Δ = (R Kᵀ U0) M_new⁻¹ U0ᵀ: [d_out, d_in]`` (float64) for one step.

        ``K_add: [d_in, n]``, ``R_add: [d_out, n]``, ``K_remove: [d_in, m]``, ``R_remove: [d_out, m]``,
        residuals on the current weight; ``R Kᵀ = R_add K_addᵀ − R_remove K_removeᵀ``.
        ``accumulate=True`` (aligned, ``cache_c``): ``M_new = M + U0ᵀ(K_add K_addᵀ − K_remove K_removeᵀ)U0``
        becomes the new state. ``accumulate=False`` (naive, paper Eq. 3): ``M_new = base + U0ᵀK_add K_addᵀU0``
        from the current keys only, and the state is neither used nor changed.
        Transactional: on any error (``ValueError`` for bad inputs, ``IllConditionedError`` if ``M_new``
        is not positive definite) the state is unchanged.
        """
        if not isinstance(accumulate, bool):
            raise ValueError(f"accumulate must be a bool, got {accumulate!r}")
        if not accumulate and (K_remove is not None or R_remove is not None):
            raise ValueError("K_remove needs accumulate=True: the naive form keeps no keys to remove")
        U0 = self._null.U0
        # M lives in null-space coordinates, so only the keys' part U0ᵀ K: [r, n+m] enters it.
        step = self._prepare(self._M if accumulate else self._base(), K_add, R_add, K_remove, R_remove, basis=U0)
        if step.empty:
            return torch.zeros(step.R.shape[0], self.d_in, dtype=torch.float64, device=self.device)
        L = self._factor(step.gram, step.hint("M"))
        # R (U0 M⁻¹ U0ᵀ K)ᵀ costs O(r·n·d + d_out·n·d); forming R Kᵀ U0 first would cost O(d_out·r·d),
        # far more with n (keys per step) ≪ d_out.
        G = U0 @ cho_solve(L, step.Kc)
        if accumulate:
            self._M, self._L, self._n = step.gram, L, step.n_constraints
        return step.R @ G.mT

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Flat dict of contiguous tensors, floats, ints and bools (the null space's entries included);
        ``from_state_dict`` restores a system whose next answers are bitwise identical."""
        return {
            **self._null.state_dict(),
            "M": self._M.contiguous(),
            "alpha": self._alpha,
            "lam": self._lam,
            "full": self._full,
            "n_constraints": self._n,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, device: torch.device | str | None = None) -> AlphaEditSystem:
        """Rebuild from ``state_dict()`` output (``M: [r, r]`` refactorised), optionally on ``device``."""
        require(state, ("M", "alpha", "lam", "full", "n_constraints"), "AlphaEditSystem")
        self = cls.__new__(cls)
        self._null = NullSpace.from_state_dict(state, device=device)
        self._configure(state["alpha"], state["lam"], state["full"])
        self._restore_count(state)
        self._M = matrix(state["M"], "state['M']", self.r, self.r, self.device)
        self._L = self._factor(self._M, "the stored M is corrupt")
        return self
