"""The per-layer state interface every editing method implements, and its persistence.

A :class:`LayerMethodState` is built by its form (``MethodSpec.init_layer``) from ``Σ₀: [d_in, d_in]``,
``λ`` and ``W₀: [d_out, d_in]``. Each step gets the batch's keys ``K: [d_in, n]`` and residuals
``R = V − W K: [d_out, n]`` on the **deployed** weight ``W`` and returns a :class:`StepResult`; the
caller deploys ``W + applied`` and, after the last step of a run, adds ``finalize(W)`` if the form
has an end-of-run update. Nothing here knows about models; everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .spec import MethodSpec
from .tensors import as64

__all__ = ["LayerMethodState", "StepResult"]


@dataclass(frozen=True)
class StepResult:
    """One step of one layer, both ``[d_out, d_in]`` float64: ``applied`` is the update to add to the
    deployed ``W``; ``raw`` the solved update before R_p (``= applied`` without post-processing)."""

    applied: Tensor
    raw: Tensor


class LayerMethodState:
    """Per-layer state of one method form; subclasses implement ``create``, ``_step``, ``_dump`` and
    ``_load`` (and ``finalize`` / ``system`` where the form has them) and are registered with
    :func:`~seqedit.methods.register_method`.

    Invariant of the forms with ``matches_one_time``: with fixed ``(K, V)`` and ``R = V − W K`` on the
    deployed ``W``, ``W_{t−1} + raw_t`` equals the one-time solution of all batches so far. States are
    transactional where their components are: a failed step (bad shapes, singular system) leaves them
    unchanged, and a step replaces tensors, never modifies them in place (snapshots share them).
    """

    spec: MethodSpec

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec

    @classmethod
    def create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        """A fresh state; ``W0`` is float64 and ``sigma0`` has been shape-checked against it."""
        raise NotImplementedError

    def step(self, K: Tensor, R: Tensor, W: Tensor) -> StepResult:
        """Edit with keys ``K: [d_in, n]`` and residuals ``R: [d_out, n]`` on the deployed
        ``W: [d_out, d_in]``; returns :class:`StepResult` (the state advances to this step)."""
        W = as64(W, "W")
        applied, raw = self._step(as64(K, "K").to(W.device), as64(R, "R").to(W.device), W)
        return StepResult(applied, raw)

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @property
    def system(self) -> Any:
        """The normal-equation system carried across steps (``LayerSystem`` / ``AlphaEditSystem``), or
        ``None`` for forms that keep none. Forms with ``removal="system"`` must expose one whose
        ``update(K_add, R_add, K_remove, R_remove)`` adds and removes constraints exactly."""
        return None

    def relam(self, lam: float, sigma0: Tensor, W: Tensor, W0: Tensor) -> Tensor:
        """Change the preservation weight to ``lam`` (the state advances) and return the update
        ``[d_out, d_in]`` that moves the deployed ``W`` to the optimum of the same constraints under it:
        ``W`` + update is the one-time solution with ``lam``. Forms without an exact re-formation
        raise ``ValueError``."""
        raise ValueError(f"{self.spec.label} cannot change λ exactly (only forms whose weights are the "
                         "optimum of one accumulated system can: memit/aligned, rlsedit)")

    def finalize(self, W: Tensor) -> Tensor | None:
        """Update ``[d_out, d_in]`` to add to the deployed ``W`` after the last step, or ``None``
        (forms with ``Capabilities.finalize`` only)."""
        return None

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Nested dict of tensors and JSON-safe scalars; ``from_state_dict`` restores the state."""
        return {"spec": self.spec.to_dict(), **self._dump()}

    def _dump(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, device: torch.device | str | None = None) -> LayerMethodState:
        """Restore a state saved by ``state_dict`` (the registered form's class, whatever ``cls`` is)."""
        if "spec" not in state:
            raise ValueError("method state is missing 'spec'")
        spec = MethodSpec.from_dict(state["spec"])
        klass = spec.form.state
        self = klass.__new__(klass)
        self.spec = spec
        self._load(state, device)
        return self

    def _load(self, state: dict[str, Any], device: torch.device | str | None) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.label})"
