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

from seqedit.errors import IllConditionedError
from seqedit.linalg.solvers import (
    SINGULAR_COND,
    check_condition,
    cho_solve,
    cholesky_factor,
    inverse_from_factor,
    symmetrize,
    woodbury_downdate,
    woodbury_solve,
    woodbury_update,
)

__all__ = ["SOLVERS", "ConditioningWarning", "LayerSystem"]

SOLVERS = ("cholesky", "woodbury")

# Relative to max|Σ₀|: loose enough for a Σ₀ accumulated in float32, tight enough to reject a
# matrix that is not a covariance at all (e.g. a transposed or wrong tensor).
_SYMMETRY_RTOL = 1e-4


class ConditioningWarning(UserWarning):
    """The condition estimate of a layer's ``A`` exceeds ``cond_warn``; answers lose accuracy."""


def _nonneg(x: Any, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {x!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be finite and ≥ 0, got {x!r}")
    return v


def _matrix(X: Any, name: str, rows: int | None, cols: int | None, device: torch.device) -> Tensor:
    """``X`` as a finite float64 matrix on ``device``, checked against the expected shape."""
    want = f"[{'?' if rows is None else rows}, {'?' if cols is None else cols}]"
    if not isinstance(X, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {want}, got {type(X).__name__}")
    if X.ndim != 2 or (rows is not None and X.shape[0] != rows) or (cols is not None and X.shape[1] != cols):
        raise ValueError(f"{name} must have shape {want}, got {tuple(X.shape)}")
    X = X.to(device=device, dtype=torch.float64)
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return X


def _square(X: Any, name: str, device: torch.device | None) -> Tensor:
    X = _matrix(X, name, None, None, device or torch.device("cpu"))
    if X.shape[0] != X.shape[1] or X.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix [d_in, d_in], got shape {tuple(X.shape)}")
    return X


_A_NAME = "A = λΣ₀ + ρI + Σ k kᵀ"


def _check_symmetric(S: Tensor, name: str) -> None:
    asym = (S - S.mT).abs().max().item()
    tol = _SYMMETRY_RTOL * S.abs().max().item()
    if asym > tol:
        raise ValueError(
            f"{name} is not symmetric: max |S − Sᵀ| = {asym:.3g} exceeds {_SYMMETRY_RTOL:g}·max|S| = {tol:.3g}"
        )


def _edit_columns(
    d_in: int,
    device: torch.device,
    K_add: Tensor | None,
    R_add: Tensor | None,
    K_remove: Tensor | None,
    R_remove: Tensor | None,
) -> tuple[Tensor, Tensor, int]:
    """``K = [K_add | K_remove]: [d_in, n+m]``, ``R = [R_add | −R_remove]: [d_out, n+m]`` and ``n``.

    Removing a fact is adding it with the opposite residual sign, while its key leaves the Gram
    matrix (the caller splits ``K`` at column ``n`` for that).
    """
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for which, K, R in (("add", K_add, R_add), ("remove", K_remove, R_remove)):
        if K is None and R is None:
            continue
        if K is None or R is None:
            raise ValueError(f"K_{which} and R_{which} must both be given or both be None")
        K = _matrix(K, f"K_{which}", d_in, None, device)
        pairs[which] = (K, _matrix(R, f"R_{which}", None, K.shape[1], device))
    if not pairs:
        raise ValueError("update needs K_add/R_add, K_remove/R_remove, or both")
    d_outs = sorted({R.shape[0] for _, R in pairs.values()})
    if len(d_outs) > 1:
        raise ValueError(f"R_add and R_remove disagree on d_out: {d_outs}")
    f64 = {"dtype": torch.float64, "device": device}
    none = (torch.empty(d_in, 0, **f64), torch.empty(d_outs[0], 0, **f64))
    Ka, Ra = pairs.get("add", none)
    Kr, Rr = pairs.get("remove", none)
    return torch.cat([Ka, Kr], dim=1), torch.cat([Ra, -Rr], dim=1), Ka.shape[1]


def _gram_update(G: Tensor, n_in_force: int, Ka: Tensor, Kr: Tensor) -> tuple[Tensor, int]:
    """``(sym(G + Ka Kaᵀ − Kr Krᵀ), n_in_force + #Ka − #Kr)`` for a Gram-type matrix ``G: [p, p]``;
    ``G`` itself is never modified. Raises ``ValueError`` if more constraints would leave than are in
    force (the state is untouched then)."""
    n_new = n_in_force + Ka.shape[1] - Kr.shape[1]
    if n_new < 0:
        raise ValueError(f"cannot remove {Kr.shape[1]} constraints: only {n_in_force + Ka.shape[1]} would be in force")
    G_new = torch.addmm(G, Ka, Ka.mT)
    G_new.addmm_(Kr, Kr.mT, alpha=-1)  # in place on the fresh tensor only
    return symmetrize(G_new), n_new


class LayerSystem:
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
        dev = torch.device(device) if device is not None else getattr(sigma0, "device", None)
        S = _square(sigma0, "sigma0", dev)
        _check_symmetric(S, "sigma0")
        A = self._lam * symmetrize(S) + self._ridge * torch.eye(S.shape[0], dtype=S.dtype, device=dev)
        self._n = 0
        self._install(A, self._factor(A, "raise lam or add a ridge (ridge > 0)"))

    def _configure(self, lam: float, ridge: float, solver: str, reanchor_every: int, cond_warn: float) -> None:
        self._lam = _nonneg(lam, "lam")
        self._ridge = _nonneg(ridge, "ridge")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
        if isinstance(reanchor_every, bool) or not isinstance(reanchor_every, int) or reanchor_every < 1:
            raise ValueError(f"reanchor_every must be an int ≥ 1, got {reanchor_every!r}")
        try:
            cond_warn = float(cond_warn)
        except (TypeError, ValueError):
            raise ValueError(f"cond_warn must be a real number, got {cond_warn!r}") from None
        if not cond_warn > 0:
            raise ValueError(f"cond_warn must be > 0 (inf disables the warning), got {cond_warn!r}")
        self._solver = solver
        self._reanchor_every = reanchor_every
        self._cond_warn = cond_warn

    def _factor(self, A: Tensor, hint: str) -> Tensor:
        """Cholesky factor of ``A``; raises if (numerically) singular, warns if ill-conditioned."""
        d = A.shape[0]
        try:
            L = cholesky_factor(A, name=_A_NAME)
            cond = check_condition(L, SINGULAR_COND, name=_A_NAME)
        except IllConditionedError as e:
            raise IllConditionedError(f"{e}; {hint}") from None
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
    def n_constraints(self) -> int:
        """Number of key columns in force (added minus removed)."""
        return self._n

    @property
    def lam(self) -> float:
        return self._lam

    @property
    def ridge(self) -> float:
        return self._ridge

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
        K, R, n_add = _edit_columns(self.d_in, self.device, K_add, R_add, K_remove, R_remove)
        Ka, Kr = K[:, :n_add], K[:, n_add:]
        A_new, n_new = _gram_update(self._A, self._n, Ka, Kr)
        if K.shape[1] == 0:
            return R, torch.zeros(self.d_in, 0, dtype=torch.float64, device=self.device)
        hint = (
            f"the update (+{Ka.shape[1]}/−{Kr.shape[1]} keys) would leave A without a positive definite "
            "factorisation (removed keys must be keys in force); state unchanged"
        )
        # Only the factorisation / capacitance solves can fail, and they run before any commit.
        if self._solver == "cholesky" or self._since_anchor + 1 >= self._reanchor_every:
            self._install(A_new, self._factor(A_new, hint))
        else:
            assert self._C is not None
            try:
                C_new = woodbury_downdate(woodbury_update(self._C, Ka), Kr)
            except IllConditionedError as e:
                raise IllConditionedError(f"{e}; {hint}") from None
            self._A, self._C = A_new, C_new
            self._since_anchor += 1
        self._n = n_new
        return R, self._solve(K)

    def _solve(self, X: Tensor) -> Tensor:
        """``A⁻¹ X`` for ``X: [d_in, m]``."""
        if self._L is not None:
            return cho_solve(self._L, X)
        assert self._C is not None
        return woodbury_solve(self._A, self._C, X)

    def solve_right(self, B: Tensor) -> Tensor:
        """``B A⁻¹: [m, d_in]`` for ``B: [m, d_in]`` (float64)."""
        return self._solve(_matrix(B, "B", None, self.d_in, self.device).mT).mT

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
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"LayerSystem state is missing {missing}")
        self = cls.__new__(cls)
        self._configure(state["lam"], state["ridge"], state["solver"], state["reanchor_every"], state["cond_warn"])
        dev = torch.device(device) if device is not None else getattr(state["A"], "device", None)
        A = _square(state["A"], "state['A']", dev)
        n = int(state["n_constraints"])
        if n < 0:
            raise ValueError(f"state['n_constraints'] must be ≥ 0, got {n}")
        self._n = n
        if self._solver == "cholesky":
            self._install(A, self._factor(A, "the stored A is corrupt"))
        else:
            if "C" not in state:
                raise ValueError("LayerSystem state for the woodbury solver is missing 'C'")
            self._A = A
            self._L = None
            self._C = _matrix(state["C"], "state['C']", A.shape[0], A.shape[0], A.device)
            self._since_anchor = int(state["since_anchor"])
            if not 0 <= self._since_anchor < self._reanchor_every:
                raise ValueError(
                    f"state['since_anchor'] must be in [0, {self._reanchor_every}), got {self._since_anchor}"
                )
        return self

    def copy(self) -> LayerSystem:
        """An independent system with the same state (tensors are shared: they are never mutated)."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new
