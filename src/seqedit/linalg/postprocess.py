"""The post-processors R_p of PRUNE and RECT (REFERENCE_NOTES §2.5), relative to the current weight.

``prune`` log-compresses the singular values of Δ above σ_max(W); ``rect`` keeps only the entries of Δ
with the largest relative change. Both follow the ``PostProcessor`` signature that
``ErrorCompensation`` applies. Pure float64 tensors in and out; nothing here knows about models.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from seqedit.linalg.checks import matrix, real

__all__ = ["PostProcessor", "prune", "rect"]

PostProcessor = Callable[[Tensor, Tensor], Tensor]
"""``R_p(Δ: [d_out, d_in], W: [d_out, d_in]) -> [d_out, d_in]``, float64; must not modify its inputs.
Post-processors used with ``ErrorCompensation.step(..., low_rank=True)`` also take ``low_rank=(U, X)``."""

# The reference's guard against dividing by a zero weight in RECT's relative change.
_RECT_EPS = 1e-8

# A factored Δ = U Vᵀ that disagrees with the dense Δ by more than this (relative, on one probe
# vector) is rejected: PRUNE would otherwise compress the singular values of another matrix.
_LOW_RANK_RTOL = 1e-6


def _same_shape(delta: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """``delta, W: [d_out, d_in]`` as finite float64 matrices on ``delta``'s device."""
    delta = matrix(delta, "delta")
    return delta, matrix(W, "W", delta.shape[0], delta.shape[1], delta.device)


def _low_rank_svd(delta: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD ``(left [d_out, k], s [k], right [d_in, k])`` of ``Δ = U Vᵀ`` with
    ``U: [d_out, n]``, ``V: [d_in, n]``, ``k = min(d_out, d_in, n)``: two thin QRs and an SVD of the
    small core ``R_U R_Vᵀ``; O((d_out + d_in)·n²) instead of a full SVD of Δ."""
    d_out, d_in = delta.shape
    U = matrix(U, "low_rank U", d_out, None, delta.device)
    V = matrix(V, "low_rank V", d_in, U.shape[1], delta.device)
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
    s_star = float(torch.linalg.matrix_norm(W, ord=2)) if sigma_max is None else real(sigma_max, "sigma_max")
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
    p = real(top_percent, "top_percent", positive=True, upper=100.0)
    delta, W = _same_shape(delta, W)
    rho = delta.abs() / (W.abs() + _RECT_EPS)
    k = math.floor(rho.numel() * (100.0 - p) / 100.0)
    if k == 0:
        return delta
    tau = torch.kthvalue(rho.flatten(), k).values
    return torch.where(rho >= tau, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
