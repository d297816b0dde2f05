"""What an editing step reports, and the hooks a caller can attach to a run.

:class:`StepReport` is returned by ``Editor.apply`` (one per step of ``Editor.run``).
:class:`EditorCallback` is the protocol of ``Editor(callbacks=[...])``: ``on_step_end`` is called after
every committed step of ``apply`` / ``run`` with the report and where the run stands
(:class:`RunPosition`), e.g. to measure the model between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .facts import Fact

__all__ = ["EditorCallback", "RunPosition", "StepReport"]


@dataclass
class StepReport:
    """What one step did: its facts (with ids), per-phase seconds and per-layer residual norms.

    ``residual_norms[layer]`` is ‖Z − H‖_F at the z-layer just before that layer was solved;
    ``final_residual`` the same after the last layer (what the edit left unexplained).
    ``drift_norms[layer]`` is ‖W_ℓ − W₀_ℓ‖_F after the step (how far the layer has moved from its base
    weight in all); ``value_work`` adds the mean ‖δ‖, its mean budget, the mean ‖h0‖ and the share of
    facts whose δ ended on the budget when the step optimised its values.
    ``seconds`` has ``templates, values, keys, solve, apply, total`` (and ``commit`` with a ledger).
    With a ledger, ``removed`` lists the ids of the facts the step replaced (or, for memorize_latest,
    forgot) and ``constraints[layer] = (K: [d_in, n], V: [d_out, n])`` the stored per-layer keys and
    absolute FFN-out targets of the step's facts (in the ledger's storage dtype).
    """

    id: int
    method: str  # MethodSpec.label, e.g. "memit/aligned"
    facts: list[Fact]
    seconds: dict[str, float]
    residual_norms: dict[int, float]
    final_residual: float
    target_norm: float  # ‖Z − H_0‖_F, the residual before any layer was edited
    value_steps: list[int]
    value_loss: list[float]
    update_norms: dict[int, float] = field(default_factory=dict)  # ‖Δ_ℓ‖_F of this step
    drift_norms: dict[int, float] = field(default_factory=dict)  # ‖W_ℓ − W₀_ℓ‖_F after this step
    value_work: dict[str, float] = field(default_factory=dict)  # tokens, padding, δ-dependent GFLOP
    removed: list[str] = field(default_factory=list)
    constraints: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "method": self.method,
            "n_facts": len(self.facts),
            "fact_ids": [f.id for f in self.facts],
            "seconds": self.seconds,
            "residual_norms": {str(k): v for k, v in self.residual_norms.items()},
            "final_residual": self.final_residual,
            "target_norm": self.target_norm,
            "mean_value_steps": sum(self.value_steps) / max(1, len(self.value_steps)),
            "update_norms": {str(k): v for k, v in self.update_norms.items()},
            "drift_norms": {str(k): v for k, v in self.drift_norms.items()},
            "value_work": self.value_work,
            "removed": list(self.removed),
        }


@dataclass(frozen=True)
class RunPosition:
    """Where a run stands after a step: ``step`` of ``steps`` (1-based), ``edited`` facts of ``total``
    done (``Editor.apply`` alone is step 1 of 1)."""

    step: int
    steps: int
    edited: int
    total: int

    @property
    def last(self) -> bool:
        return self.step == self.steps


@runtime_checkable
class EditorCallback(Protocol):
    """Hooks called by the editor; implement the ones you need (a missing hook is skipped)."""

    def on_step_end(self, editor: Any, report: StepReport, position: RunPosition) -> None:
        """After each step; ``editor`` is the :class:`~seqedit.Editor` that ran it."""
