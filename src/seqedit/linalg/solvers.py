"""Float64 kernels for the symmetric positive definite systems of seqedit (DESIGN §2, §5).

Conventions: ``A`` is ``[d, d]`` SPD, ``L`` its lower Cholesky factor (``A = L Lᵀ``), ``C = A⁻¹``.
Every routine casts its inputs to float64 and returns float64 tensors on the input's device.
Only the Woodbury helpers hold an explicit inverse (DESIGN §5); everything else solves with ``L``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seqedit.errors import IllConditionedError

__all__ = [
    "SINGULAR_COND",
    "check_condition",
    "cho_solve",
    "cholesky_factor",
    "condition_estimate",
    "inverse_from_factor",
    "symmetrize",
    "woodbury_downdate",
    "woodbury_solve",
    "woodbury_update",
]

# A computed factor of an exactly singular PSD matrix has an estimated condition of ~1e16 (backward
# error ~eps·‖A‖ puts its smallest eigenvalue there); 1e14 flags those with margin while accepting
# genuine systems whose answers still carry ~1e-2 relative accuracy or better.
SINGULAR_COND = 1e14

# Each iteration is four memory-bound passes over L; extra start vectors ride along almost free.
_ESTIMATE_ITERS = 4
_ESTIMATE_VECTORS = 4


def symmetrize(X: Tensor) -> Tensor:
    """``(X + Xᵀ) / 2``, contiguous: removes the asymmetry rounding leaves in products that are
    symmetric in exact arithmetic, and fixes the memory layout so saved and live copies of a matrix
    take the same BLAS paths (bitwise-identical answers)."""
    return ((X + X.mT) / 2).contiguous()


def _square64(A: Tensor, name: str) -> Tensor:
    if not isinstance(A, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix [d, d], got shape {tuple(A.shape)}")
    A = A.to(torch.float64)
    if not torch.isfinite(A).all():
        raise ValueError(f"{name} ({A.shape[0]}×{A.shape[0]}) contains NaN or infinite entries")
    return A


def _rhs(B: Tensor, like: Tensor) -> Tensor:
    """``B: [d, m]`` checked against the ``[d, d]`` matrix ``like`` and cast to its dtype/device."""
    if B.ndim != 2 or B.shape[0] != like.shape[0]:
        raise ValueError(f"right-hand side must be [{like.shape[0]}, m], got shape {tuple(B.shape)}")
    return B.to(like)


def cholesky_factor(A: Tensor, *, max_cond: float | None = None, name: str = "matrix") -> Tensor:
    """Lower Cholesky factor ``L`` of the SPD matrix ``A: [d, d]``.

    Raises ``IllConditionedError`` naming ``d`` and the failing pivot if ``A`` is not positive
    definite, or (via ``check_condition``) if ``max_cond`` is given and the estimate exceeds it.
    Raises ``ValueError`` if ``A`` is not square or not finite.
    """
    A = _square64(A, name)
    d = A.shape[0]
    L, info = torch.linalg.cholesky_ex(A)
    k = int(info)
    if k > 0:
        raise IllConditionedError(
            f"{name} ({d}×{d}) is not positive definite: Cholesky pivot {k} of {d} "
            f"(leading minor of order {k}) is not positive"
        )
    if max_cond is not None:
        check_condition(L, max_cond, name=name)
    return L


def check_condition(L: Tensor, max_cond: float, *, name: str = "matrix") -> float:
    """``condition_estimate(L)``, raising ``IllConditionedError`` (naming ``d`` and the estimate) if it
    exceeds ``max_cond``: the factor of a numerically singular matrix."""
    cond = condition_estimate(L)
    if not cond <= max_cond:
        d = L.shape[0]
        raise IllConditionedError(
            f"{name} ({d}×{d}) is numerically singular: condition estimate {cond:.3g} exceeds {max_cond:.3g}"
        )
    return cond


def cho_solve(L: Tensor, B: Tensor) -> Tensor:
    """Solve ``A X = B`` for ``X: [d, m]`` given ``L: [d, d]`` (``A = L Lᵀ``) and ``B: [d, m]``."""
    return torch.cholesky_solve(_rhs(B, L), L)


def condition_estimate(L: Tensor) -> float:
    """Estimate of the 2-norm condition number of ``A = L Lᵀ`` from its factor ``L: [d, d]``; O(d²).

    An estimate, not the exact value: the larger of the Cholesky pivot ratio
    ``(max diag L / min diag L)²`` and a few deterministic power / inverse iterations
    (λ_max and 1/λ_min). Both are lower bounds of the true condition number, usually within a
    small factor of it; ``inf`` when a pivot is zero.
    """
    diag = L.diagonal()
    dmin = diag.abs().min().item()
    if dmin == 0.0 or not math.isfinite(dmin):
        return math.inf
    pivot_ratio = (diag.abs().max().item() / dmin) ** 2
    d = L.shape[0]
    # A fixed seed keeps the estimate (and any warning it triggers) reproducible; several start
    # vectors make it unlikely that all are nearly orthogonal to the extreme eigenvectors.
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(d, _ESTIMATE_VECTORS, generator=gen, dtype=torch.float64).to(L)
    v, u = start, start.clone()
    lam_max = inv_lam_min = 0.0
    for _ in range(_ESTIMATE_ITERS):
        v = v / v.norm(dim=0)
        v = L @ (L.mT @ v)
        lam_max = v.norm(dim=0).max().item()
        u = u / u.norm(dim=0)
        u = torch.cholesky_solve(u, L)
        inv_lam_min = u.norm(dim=0).max().item()
    power = lam_max * inv_lam_min
    if not math.isfinite(power):
        return math.inf
    return max(pivot_ratio, power)


def woodbury_solve(A: Tensor, C: Tensor, B: Tensor) -> Tensor:
    """``X = A⁻¹ B: [d, m]`` from ``C ≈ A⁻¹`` and ``B: [d, m]``, with one step of iterative refinement.

    ``C`` carries the rounding of every Woodbury step since it was anchored (amplified by
    ``kᵀA⁻¹k`` when a new key is large relative to ``A``); correcting with the residual against the
    explicit ``A`` brings ``X`` back to the accuracy of a direct solve, at O(d²m) extra cost.
    """
    B = _rhs(B, C)
    X = C @ B
    return X + C @ (B - A @ X)


def inverse_from_factor(L: Tensor) -> Tensor:
    """Explicit ``C = A⁻¹: [d, d]`` from ``L`` — for the Woodbury path only (DESIGN §5)."""
    return symmetrize(torch.cholesky_inverse(L))


def _woodbury(C: Tensor, K: Tensor, sign: int) -> Tensor:
    K = _rhs(K, C)
    n = K.shape[1]
    if n == 0:
        return C
    F = C @ K
    # (A ± K Kᵀ)⁻¹ = C ∓ F M⁻¹ Fᵀ with the capacitance M = I ± Kᵀ F, which is SPD exactly when
    # the new A is. An update's M ⪰ I is always fine, however large; a downdate's M is the
    # positive-definiteness check, and a near-singular one means the new A lost a direction.
    M = torch.eye(n, dtype=C.dtype, device=C.device) + sign * (K.mT @ F)
    d = C.shape[0]
    L_M = cholesky_factor(
        symmetrize(M),
        max_cond=SINGULAR_COND if sign < 0 else None,
        name=f"capacitance I {'+' if sign > 0 else '−'} KᵀA⁻¹K of a {d}×{d} rank-{n} "
        f"{'update' if sign > 0 else 'downdate'}",
    )
    G = torch.linalg.solve_triangular(L_M, F.mT, upper=False)
    return symmetrize(C - sign * (G.mT @ G))


def woodbury_update(C: Tensor, K: Tensor) -> Tensor:
    """Rank-n update: from ``C = A⁻¹`` return ``(A + K Kᵀ)⁻¹``; ``C: [d, d]``, ``K: [d, n]``; O(d²n)."""
    return _woodbury(C, K, +1)


def woodbury_downdate(C: Tensor, K: Tensor) -> Tensor:
    """Rank-n downdate: from ``C = A⁻¹`` return ``(A − K Kᵀ)⁻¹``; ``C: [d, d]``, ``K: [d, n]``; O(d²n).

    Raises ``IllConditionedError`` if ``A − K Kᵀ`` is not (numerically) positive definite.
    """
    return _woodbury(C, K, -1)
