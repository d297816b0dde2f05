"""How much of what stored constraints ask of a layer its weights deliver.

A fact's constraint at a layer asks ``W k = v``; relative to the base weights that is the change
``v − W₀ k``. :func:`unmet_share` is the part of that change the weights ``W`` leave undone,
``‖W k − v‖ / ‖v − W₀ k‖`` per column: 0 when the constraint is met exactly, 1 when ``W`` does for it no
more than ``W₀`` did. With a preservation term (λΣ₀) no solution meets every constraint, and as keys
crowd the layer's key space (more facts than its ``d_in`` dimensions, or many nearly parallel keys) the
least-squares solution leaves more of each undone.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["unmet_share"]


def unmet_share(W: Tensor, W0: Tensor, K: Tensor, V: Tensor) -> Tensor:
    """``[n]`` float64: ``‖W k_i − v_i‖ / ‖v_i − W₀ k_i‖`` for ``W, W0: [d_out, d_in]``, ``K: [d_in, n]``,
    ``V: [d_out, n]``; a column that asks no change (``v_i = W₀ k_i``) scores 0 if met, else ``inf``."""
    if W.shape != W0.shape or K.shape[0] != W.shape[1] or V.shape[0] != W.shape[0] or K.shape[1] != V.shape[1]:
        raise ValueError(f"unmet_share: shapes W {tuple(W.shape)}, W0 {tuple(W0.shape)}, K {tuple(K.shape)}, "
                         f"V {tuple(V.shape)} do not fit W: [d_out, d_in], K: [d_in, n], V: [d_out, n]")
    W, W0, K, V = (t.to(torch.float64) for t in (W, W0, K, V))
    left = (W @ K - V).norm(dim=0)
    asked = (V - W0 @ K).norm(dim=0)
    out = left / asked
    return torch.where(asked > 0, out, torch.where(left > 0, torch.inf, 0.0))
