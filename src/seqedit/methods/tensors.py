"""Checked float64 tensors for the method states: inputs, and tensors read back from stored states."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["as64", "need", "stored_tensor"]


def as64(X: Any, name: str) -> Tensor:
    """``X`` as a finite 2-D float64 tensor, or ``ValueError`` naming ``name``."""
    if not isinstance(X, Tensor) or X.ndim != 2:
        got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got {got}")
    X = X.to(torch.float64)
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return X


def need(state: dict[str, Any], *keys: str) -> None:
    """Raise ``ValueError`` if a stored state lacks one of ``keys``."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"method state is missing {missing}")


def stored_tensor(state: dict[str, Any], key: str, device: torch.device | str | None) -> Tensor | None:
    """``state[key]`` as a checked float64 tensor on ``device`` (``None`` if stored as ``None``)."""
    X = state.get(key)
    if X is None:
        return None
    X = as64(X, f"state[{key!r}]")
    return X if device is None else X.to(device)
