"""Argument checks shared by seqedit.linalg.

``real`` is the one validator for float arguments; the others check counts, saved states and
matrices (finite float64, expected shape, on a device). Each raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from seqedit.linalg.solvers import symmetrize

__all__ = ["real"]

# Relative to max|Σ₀|: loose enough for a Σ₀ accumulated in float32, tight enough to reject a
# matrix that is not a covariance at all (e.g. a transposed or wrong tensor).
_SYMMETRY_RTOL = 1e-4


def real(value: Any, name: str, *, positive: bool = False, upper: float | None = None) -> float:
    """``value`` as a finite float ≥ 0 (> 0 if ``positive``, ≤ ``upper`` if given); bools are rejected."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '≥ 0'}, got {value!r}")
    if positive and v == 0:
        # A zero is finite and ≥ 0: name only the bound it misses.
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if upper is not None and v > upper:
        raise ValueError(f"{name} must be ≤ {upper:g}, got {value!r}")
    return v


def count(value: Any, name: str) -> int:
    """``value`` if it is an int ≥ 1 (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
    return value


def require(state: Mapping[str, Any], keys: Iterable[str], owner: str) -> None:
    """Raise unless the saved ``state`` of ``owner`` (a class name) has every key in ``keys``."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{owner} state is missing {missing}")


def device_of(device: torch.device | str | None, like: Any) -> torch.device:
    """``device`` if given, else the device of ``like`` (CPU for a non-tensor, which the checks reject)."""
    return torch.device(device) if device is not None else getattr(like, "device", torch.device("cpu"))


def matrix(
    X: Any, name: str, rows: int | None = None, cols: int | None = None, device: torch.device | None = None
) -> Tensor:
    """``X`` as a finite float64 ``[rows, cols]`` matrix (``None``: any size) on ``device`` (default: its own)."""
    want = f"[{'?' if rows is None else rows}, {'?' if cols is None else cols}]"
    if not isinstance(X, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {want}, got {type(X).__name__}")
    if X.ndim != 2 or (rows is not None and X.shape[0] != rows) or (cols is not None and X.shape[1] != cols):
        raise ValueError(f"{name} must have shape {want}, got {tuple(X.shape)}")
    X = X.to(device=device_of(device, X), dtype=torch.float64)
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return X


def square(X: Any, name: str, device: torch.device | None = None) -> Tensor:
    """``X`` as a finite float64 non-empty ``[d, d]`` matrix on ``device`` (default: its own)."""
    X = matrix(X, name, device=device)
    if X.shape[0] != X.shape[1] or X.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix [d_in, d_in], got shape {tuple(X.shape)}")
    return X


def symmetric(X: Any, name: str, device: torch.device | None = None) -> Tensor:
    """``X: [d, d]`` checked as by ``square`` and for symmetry (relative ``1e-4``), returned symmetrized."""
    S = square(X, name, device)
    asym = (S - S.mT).abs().max().item()
    tol = _SYMMETRY_RTOL * S.abs().max().item()
    if asym > tol:
        raise ValueError(
            f"{name} is not symmetric: max |S − Sᵀ| = {asym:.3g} exceeds {_SYMMETRY_RTOL:g}·max|S| = {tol:.3g}"
        )
    return symmetrize(S)
