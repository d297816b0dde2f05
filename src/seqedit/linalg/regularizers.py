"""Operators of the method variants on top of the layer normal equations (REFERENCE_NOTES §2.4–2.6).

- ``NullSpace`` / ``AlphaEditSystem``: AlphaEdit's update, restricted to the approximate null space of
  Σ₀ and solved in reduced r×r coordinates (§2.4, §5.3.9).
- ``prune`` / ``rect``: the post-processors R_p of PRUNE and RECT, relative to the current weight (§2.5).
- ``ErrorCompensation``: the carried error E of Algorithm 1, which keeps ``W_{t−1} + Δ_t`` equal to
  the one-time solution whatever R_p does (§2.6).

Pure float64 tensors in and out (on the inputs' device); nothing here knows about models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from seqedit.errors import IllConditionedError
from seqedit.linalg.normal_eq import LayerSystem, _check_symmetric, _edit_columns, _gram_update, _matrix, _nonneg, _square
from seqedit.linalg.solvers import SINGULAR_COND, cho_solve, cholesky_factor, symmetrize

__all__ = ["AlphaEditSystem", "ErrorCompensation", "NullSpace", "PostProcessor", "prune", "rect"]

PostProcessor = Callable[[Tensor, Tensor], Tensor]
"""``R_p(Δ: [d_out, d_in], W: [d_out, d_in]) -> [d_out, d_in]``, float64; must not modify its inputs.
Post-processors used with ``ErrorCompensation.step(..., low_rank=True)`` also take ``low_rank=(U, X)``."""

# The reference's guard against dividing by a zero weight in RECT's relative change.
_RECT_EPS = 1e-8

# A factored Δ = U Vᵀ that disagrees with the dense Δ by more than this (relative, on one probe
# vector) is rejected: PRUNE would otherwise compress the singular values of another matrix.
_LOW_RANK_RTOL = 1e-6


def _positive(x: Any, name: str) -> float:
    v = _nonneg(x, name)
    if v == 0:
        raise ValueError(f"{name} must be > 0, got {x!r}")
    return v


# ---------------------------------------------------------------------------------------- AlphaEdit


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
        self._threshold = _positive(threshold, "threshold")
        U0 = _matrix(U0, "U0", None, None, getattr(U0, "device", torch.device("cpu")))
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
        thr = _positive(threshold, "threshold")
        dev = torch.device(device) if device is not None else getattr(sigma0, "device", None)
        S = _square(sigma0, "sigma0", dev)
        _check_symmetric(S, "sigma0")
        evals, Q = torch.linalg.eigh(symmetrize(S))
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

    def project(self, X: Tensor) -> Tensor:
        """``P X = U0 (U0ᵀ X)`` for ``X: [d]`` or ``[d, m]``; float64, same shape as ``X``."""
        if not isinstance(X, Tensor) or X.ndim not in (1, 2) or X.shape[0] != self.d:
            got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(f"X must be a tensor [{self.d}] or [{self.d}, m], got {got}")
        X = X.to(device=self.device, dtype=torch.float64)
        return self._U0 @ (self._U0.mT @ X)

    def state_dict(self) -> dict[str, Any]:
        return {
            "U0": self._U0.contiguous(),
            "eigenvalues": self._eigenvalues.contiguous(),
            "threshold": self._threshold,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, device: torch.device | str | None = None) -> NullSpace:
        missing = [k for k in ("U0", "eigenvalues", "threshold") if k not in state]
        if missing:
            raise ValueError(f"NullSpace state is missing {missing}")
        U0, ev = state["U0"], state["eigenvalues"]
        if device is not None and isinstance(U0, Tensor) and isinstance(ev, Tensor):
            U0, ev = U0.to(device), ev.to(device)
        return cls(U0, ev, state["threshold"])


class AlphaEditSystem:
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
        self._alpha = _positive(alpha, "alpha")
        self._lam = _nonneg(lam, "lam")
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
        try:
            return cholesky_factor(M, max_cond=SINGULAR_COND, name=f"reduced AlphaEdit matrix M ({self.r}×{self.r})")
        except IllConditionedError as e:
            raise IllConditionedError(f"{e}; {hint}") from None

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
    def lam(self) -> float:
        return self._lam

    @property
    def full(self) -> bool:
        return self._full

    @property
    def n_constraints(self) -> int:
        """Number of key columns in the accumulated Gram (added minus removed; naive steps add none)."""
        return self._n

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
        K, R, n_add = _edit_columns(self.d_in, self.device, K_add, R_add, K_remove, R_remove)
        n_rem = K.shape[1] - n_add
        U0 = self._null.U0
        Kn = U0.mT @ K  # [r, n+m]: the keys in null-space coordinates
        M_new, n_new = _gram_update(self._M if accumulate else self._base(), self._n, Kn[:, :n_add], Kn[:, n_add:])
        if K.shape[1] == 0:
            return torch.zeros(R.shape[0], self.d_in, dtype=torch.float64, device=self.device)
        L = self._factor(
            M_new,
            f"the update (+{n_add}/−{n_rem} keys) would leave M without a positive definite factorisation "
            "(removed keys must be keys in force); state unchanged",
        )
        # R (U0 M⁻¹ U0ᵀ K)ᵀ costs O(r·n·d + d_out·n·d); forming R Kᵀ U0 first would cost O(d_out·r·d),
        # far more with n (keys per step) ≪ d_out.
        G = U0 @ cho_solve(L, Kn)
        if accumulate:
            self._M, self._L, self._n = M_new, L, n_new
        return R @ G.mT

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
        missing = [k for k in ("M", "alpha", "lam", "full", "n_constraints") if k not in state]
        if missing:
            raise ValueError(f"AlphaEditSystem state is missing {missing}")
        self = cls.__new__(cls)
        self._null = NullSpace.from_state_dict(state, device=device)
        self._configure(state["alpha"], state["lam"], state["full"])
        n = int(state["n_constraints"])
        if n < 0:
            raise ValueError(f"state['n_constraints'] must be ≥ 0, got {n}")
        self._n = n
        self._M = _matrix(state["M"], "state['M']", self.r, self.r, self.device)
        self._L = self._factor(self._M, "the stored M is corrupt")
        return self

    def copy(self) -> AlphaEditSystem:
        """An independent system with the same state (tensors are shared: they are never mutated)."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new


# ---------------------------------------------------------------------------------------- R_p


def _same_shape(delta: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    dev = getattr(delta, "device", torch.device("cpu"))
    delta = _matrix(delta, "delta", None, None, dev)
    return delta, _matrix(W, "W", delta.shape[0], delta.shape[1], dev)


def _low_rank_svd(delta: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD ``(left [d_out, k], s [k], right [d_in, k])`` of ``Δ = U Vᵀ`` with
    ``U: [d_out, n]``, ``V: [d_in, n]``, ``k = min(d_out, d_in, n)``: two thin QRs and an SVD of the
    small core ``R_U R_Vᵀ``; O((d_out + d_in)·n²) instead of a full SVD of Δ."""
    d_out, d_in = delta.shape
    U = _matrix(U, "low_rank U", d_out, None, delta.device)
    V = _matrix(V, "low_rank V", d_in, U.shape[1], delta.device)
    # One probe vector, O(d_out·d_in): catches factors of another matrix, e.g. (R, A⁻¹K) passed while
    # Δ also carries Algorithm 1's −E A⁻¹ term and is no longer low-rank.
    x = torch.randn(d_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(delta.device)
    dx, ux = delta @ x, U @ (V.mT @ x)
    if (dx - ux).norm() > _LOW_RANK_RTOL * max(dx.norm().item(), ux.norm().item(), 1e-300):
        raise ValueError("low_rank=(U, V) does not factor delta: U Vᵀ ≠ delta")
    Qu, Ru = torch.linalg.qr(U)
    Qv, Rv = torch.linalg.qr(V)
    a, s, bh = torch.linalg.svd(Ru @ Rv.mT, full_matrices=False)
    return Qu @ a, s, Qv @ bh.mT


def prune(
    delta: Tensor,
    W: Tensor,
    *,
    low_rank: tuple[Tensor, Tensor] | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """PRUNE's R_p: log-compress the singular values of ``delta`` that exceed ``σ* = σ_max(W)``.

    ``delta, W: [d_out, d_in]``. Each singular value ``s_i > σ*`` of Δ becomes ``ln s_i − ln σ* + σ*``;
    the others and all singular vectors are kept (REFERENCE_NOTES §2.5; for σ* < 1 the map can also
    enlarge values just above σ*, as the reference's does).

    ``σ*`` is ``torch.linalg.matrix_norm(W, 2)``, exact (singular values only, no vectors); pass
    ``sigma_max`` to reuse one computed elsewhere (e.g. by power iteration once per layer and step).
    With ``low_rank=(U, V)`` (``U: [d_out, n]``, ``V: [d_in, n]``, ``delta = U Vᵀ``) the singular
    values come from two thin QRs and an n×n SVD; otherwise from the singular values of ``delta`` and,
    only if one exceeds σ*, one thin SVD. If none exceeds σ*, ``delta`` itself is returned.
    Raises ``ValueError`` on shape mismatches, non-finite input, ``σ* ≤ 0`` (zero ``W``) or factors
    that do not reproduce ``delta``.
    """
    delta, W = _same_shape(delta, W)
    s_star = float(torch.linalg.matrix_norm(W, ord=2)) if sigma_max is None else _nonneg(sigma_max, "sigma_max")
    if not s_star > 0:
        raise ValueError("PRUNE needs σ_max(W) > 0 (ln σ* enters the compression); got a zero W or sigma_max=0")
    if low_rank is None:
        if delta.numel() == 0 or torch.linalg.matrix_norm(delta, ord=2).item() <= s_star:
            return delta
        left, s, rh = torch.linalg.svd(delta, full_matrices=False)
        right = rh.mT
    else:
        if not isinstance(low_rank, tuple) or len(low_rank) != 2:
            raise ValueError("low_rank must be a pair (U: [d_out, n], V: [d_in, n]) with delta = U Vᵀ")
        left, s, right = _low_rank_svd(delta, *low_rank)
        if s.numel() == 0 or s[0].item() <= s_star:
            return delta
    big = s > s_star
    s_big = s[big]
    s_new = torch.log(s_big) - math.log(s_star) + s_star
    # Only the compressed directions change: Δ + Σ_{s_i>σ*} (s'_i − s_i) u_i v_iᵀ = U diag(s') Vᵀ, at
    # O(d_out·d_in·k) for the k (typically 1–2) compressed values instead of rebuilding all of Δ.
    return delta + (left[:, big] * (s_new - s_big)) @ right[:, big].mT


def rect(delta: Tensor, W: Tensor, top_percent: float = 20.0) -> Tensor:
    """RECT's R_p: keep the entries of ``delta`` with the largest relative change, zero the rest.

    ``delta, W: [d_out, d_in]``. ``ρ = |Δ| / (|W| + 1e-8)`` element-wise; ``τ`` is the k-th smallest ρ
    (``torch.kthvalue``) with ``k = ⌊numel·(100 − p)/100⌋``, and entries with ``ρ ≥ τ`` are kept
    unchanged — the top ``p = top_percent`` % plus one entry, and every entry tied with τ, so the mask
    depends only on the values (never on their order). ``k = 0`` keeps everything.
    The reference divides by ``|W + 1e-8|``; ``|W| + 1e-8`` differs only for |W| ≈ 1e-8 and cannot
    divide by zero. Raises ``ValueError`` for ``top_percent`` outside (0, 100] or mismatched shapes.
    """
    try:
        p = float(top_percent)
    except (TypeError, ValueError):
        raise ValueError(f"top_percent must be a real number in (0, 100], got {top_percent!r}") from None
    if not 0 < p <= 100:
        raise ValueError(f"top_percent must be in (0, 100], got {top_percent!r}")
    delta, W = _same_shape(delta, W)
    rho = delta.abs() / (W.abs() + _RECT_EPS)
    k = math.floor(rho.numel() * (100.0 - p) / 100.0)
    if k == 0:
        return delta
    tau = torch.kthvalue(rho.flatten(), k).values
    return torch.where(rho >= tau, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


# ---------------------------------------------------------------------------------------- Algorithm 1


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
        for name, v in (("d_out", d_out), ("d_in", d_in)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {v!r}")
        self._d_out, self._d_in = d_out, d_in
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
        (``Δ_t = U Xᵀ``), passed while ``E = 0`` (then ``Δ_t`` has rank ≤ n; otherwise ``None``). Transactional: if validation, the system update or ``post``
        fails (or ``post`` returns a wrong shape or non-finite values), ``system`` and ``E`` are unchanged.
        """
        if not isinstance(system, LayerSystem):
            raise ValueError(f"system must be a LayerSystem, got {type(system).__name__}")
        if system.d_in != self._d_in:
            raise ValueError(f"system has d_in={system.d_in}, this ErrorCompensation d_in={self._d_in}")
        if not callable(post):
            raise ValueError(f"post must be callable (Δ, W) -> Δ, got {type(post).__name__}")
        dev = system.device
        K = _matrix(K, "K", self._d_in, None, dev)
        R = _matrix(R, "R", self._d_out, K.shape[1], dev)
        W = _matrix(W, "W", self._d_out, self._d_in, dev)
        snapshot = system.copy()
        try:
            U, X = system.update_factors(K, R)
            raw = U @ X.mT
            factors = (U, X) if self._E is None else None
            if self._E is not None:
                raw = raw - system.solve_right(self._E.to(dev))
            out = post(raw, W, low_rank=factors) if low_rank else post(raw, W)
            applied = _matrix(out, "post(Δ, W)", self._d_out, self._d_in, dev)
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
        missing = [k for k in ("d_out", "d_in") if k not in state]
        if missing:
            raise ValueError(f"ErrorCompensation state is missing {missing}")
        E = state.get("E")
        if device is None and isinstance(E, Tensor):
            device = E.device
        self = cls(state["d_out"], state["d_in"], device=device)
        if E is not None:
            self._E = _matrix(E, "state['E']", self._d_out, self._d_in, self._device)
        return self
