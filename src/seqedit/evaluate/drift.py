"""Drift of the edited model on held-out text: perplexity and top-1 agreement (REFERENCE_NOTES §3.5).

Text: WikiText-2 raw **test** (disjoint from the validation text used for key statistics), tokenised
without special tokens and cut into consecutive fixed-length windows; the first ``n_windows`` are used.
Within a window, every token but the first is predicted from the tokens before it (no BOS is added, so
the same ids work for every family). Units: NLL in nats per predicted token.

* ``PPL = exp(mean NLL over predicted tokens)`` (the first token of a window is not counted, unlike the
  official ``util/perplexity.py``).
* ``agreement = mean 1[argmax p_edit = argmax p_orig]`` over the same positions, against argmax ids
  cached from the unedited model by :func:`drift_reference` (so one model in memory suffices).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..shared_data import wikitext_path
from .scoring import forward_log_probs

__all__ = ["DriftReference", "DriftResult", "drift_metrics", "drift_reference", "wikitext_windows"]


def wikitext_windows(tokenizer, window: int = 256, n_windows: int = 32, split: str = "test") -> np.ndarray:
    """The first ``n_windows`` consecutive ``window``-token windows of WikiText-2 ``split``: ``[N, W]`` int64.

    Only as much text as needed is tokenised (a growing prefix, cut at a line end), so short runs stay
    cheap; fewer windows are returned if the file runs out.
    """
    if window < 2 or n_windows < 1:
        raise ValueError(f"need window >= 2 and n_windows >= 1, got {window}, {n_windows}")
    text = wikitext_path(split).read_text(encoding="utf-8")
    need = window * n_windows
    chars = need * 6  # ~4-5 characters per token in English BPE; grow if short
    while True:
        cut = len(text) if chars >= len(text) else text.rfind("\n", 0, chars) + 1 or chars
        ids = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
        if len(ids) >= need or cut == len(text):
            break
        chars *= 2
    n = min(n_windows, len(ids) // window)
    return np.asarray(ids[: n * window], dtype=np.int64).reshape(n, window)


@dataclass(frozen=True)
class DriftReference:
    """Cached pre-edit data: ``windows [N, W]`` token ids and ``argmax [N, W-1]`` predicted ids
    (``argmax[i, t]`` is the unedited model's top-1 for ``windows[i, t+1]``), plus its NLL/PPL."""

    windows: np.ndarray
    argmax: np.ndarray
    ppl: float

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an ``.npz`` file atomically, at exactly ``path`` (returned)."""

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
                np.savez(fh, windows=self.windows, argmax=self.argmax, ppl=np.float64(self.ppl))

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DriftReference:
        with np.load(path) as z:
            return cls(z["windows"], z["argmax"], float(z["ppl"]))


@dataclass(frozen=True)
class DriftResult:
    """``ppl`` (exp of ``mean_nll``, nats/token) and top-1 ``agreement`` in [0, 1] over ``n_tokens``."""

    ppl: float
    mean_nll: float
    agreement: float
    n_tokens: int


@torch.no_grad()
def _nll_and_argmax(loaded, windows: np.ndarray, batch_rows: int) -> tuple[float, np.ndarray]:
    """Mean NLL (nats) over predicted tokens and argmax ids ``[N, W-1]`` on the current model."""
    total, count, argmax = 0.0, 0, []
    rows = windows.tolist()
    for lo, logp in forward_log_probs(loaded, rows, batch_rows):
        ids = torch.as_tensor(windows[lo : lo + len(logp)], device=logp.device)
        picked = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # log p(x_t | x_<t), t >= 1
        total += float(-picked.double().sum())
        count += picked.numel()
        argmax.append(logp[:, :-1].argmax(-1).cpu().numpy())
    return total / count, np.concatenate(argmax).astype(np.int64)


def drift_reference(
    loaded, window: int = 256, n_windows: int = 32, split: str = "test", batch_rows: int = 8
) -> DriftReference:
    """Run BEFORE editing: windows and the unedited model's argmax ids to cache (see :meth:`DriftReference.save`)."""
    windows = wikitext_windows(loaded.tokenizer, window, n_windows, split)
    nll, argmax = _nll_and_argmax(loaded, windows, batch_rows)
    return DriftReference(windows, argmax, math.exp(nll))


def drift_metrics(loaded, reference: DriftReference, batch_rows: int = 8) -> DriftResult:
    """Perplexity and top-1 agreement of the current (edited) model on the reference's windows."""
    nll, argmax = _nll_and_argmax(loaded, reference.windows, batch_rows)
    if argmax.shape != reference.argmax.shape:
        raise ValueError(f"reference argmax has shape {reference.argmax.shape}, expected {argmax.shape}")
    return DriftResult(math.exp(nll), nll, float((argmax == reference.argmax).mean()), int(argmax.size))
