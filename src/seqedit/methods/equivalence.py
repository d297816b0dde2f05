"""Sequential vs one-time editing of one layer on fixed ``(K, V)`` batches: the OTE–SE gap of a form.

Pure linear algebra on the method states; :mod:`seqedit.evaluate.equivalence` runs it on a real
model's keys and values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .spec import MethodSpec
from .tensors import as64

__all__ = ["equivalence"]


def _rel_gap(W: Tensor, W_ref: Tensor, W0: Tensor) -> float:
    scale = torch.linalg.matrix_norm(W_ref - W0).item()
    gap = torch.linalg.matrix_norm(W - W_ref).item()
    return gap / scale if scale > 0 else (0.0 if gap == 0 else math.inf)


def _run(spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor, batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Deployed weight after all batches (and ``finalize``) and ``W_{T−1} + raw_T`` before R_p/finalize."""
    state = spec.init_layer(sigma0, lam, W0)
    W = W0
    W_raw = W0
    for K, V in batches:
        K = as64(K, "K").to(W.device)
        res = state.step(K, as64(V, "V").to(W.device) - W @ K, W)
        W_raw = W + res.raw
        W = W + res.applied
    fin = state.finalize(W)
    return (W if fin is None else W + fin), W_raw


def equivalence(
    spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor, batches: list[tuple[Tensor, Tensor]]
) -> dict[str, Any]:
    """Sequential vs one-time editing of fixed batches ``(K: [d_in, n_i], V: [d_out, n_i])``.

    Sequential: one step per batch with ``R = V − W K`` on the deployed ``W``; one-time: a fresh state
    and one step with all columns. Returns JSON-safe ``{"method", "steps", "n_facts",
    "gap_deployed", "gap_raw"}``: ``gap_deployed = ‖W_SE − W_OTE‖_F / ‖W_OTE − W₀‖_F`` on the deployed
    weights (after ``finalize``); for post-processed forms also ``gap_raw``, the same gap of
    ``W_{T−1} + raw_T`` against the unprocessed one-time ``W₀ + raw`` (``None`` for the others). Forms
    with ``matches_one_time`` give round-off gaps; naive and uncorrected forms do not (memorize_latest
    is not meant to match: it keeps only the newest batch).
    """
    if not batches:
        raise ValueError("equivalence needs at least one (K, V) batch")
    W0 = as64(W0, "W0")
    W_se, W_se_raw = _run(spec, sigma0, lam, W0, batches)
    K_all = torch.cat([as64(K, "K").to(W0.device) for K, _ in batches], dim=1)
    V_all = torch.cat([as64(V, "V").to(W0.device) for _, V in batches], dim=1)
    W_ote, W_ote_raw = _run(spec, sigma0, lam, W0, [(K_all, V_all)])
    return {
        "method": spec.label,
        "steps": len(batches),
        "n_facts": K_all.shape[1],
        "gap_deployed": _rel_gap(W_se, W_ote, W0),
        "gap_raw": _rel_gap(W_se_raw, W_ote_raw, W0) if spec.post_processed else None,
    }
