"""Progress of long work as typed events: what the editor, Σ₀ statistics and evaluation runs report.

A producer calls ``progress(ProgressEvent(...))``; a front end (the CLI's Rich bars, a service's
log) turns events into whatever it draws. ``start=True`` opens a new bar for ``phase`` with
``total`` units (``None``: unknown); otherwise ``advance`` units of ``phase`` are done. ``STATUS``
events carry a ``message`` saying what is running now and advance nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

__all__ = ["Phase", "ProgressCallback", "ProgressEvent", "emit", "counter"]


class Phase(str, Enum):
    """What is progressing, with its unit."""

    STATS = "stats"  # Σ₀ statistics, tokens
    VALUES = "values"  # value optimisation, facts
    LAYERS = "layers"  # layer solves of one step
    STEPS = "steps"  # steps of one run
    CONFIGS = "configs"  # configurations of an evaluation
    SCORING = "scoring"  # scored prompt rows of an evaluation pass
    STATUS = "status"  # a message only

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Phase.STATS: "Σ₀ statistics (tokens)",
    Phase.VALUES: "value optimisation (facts)",
    Phase.LAYERS: "layer solves",
    Phase.STEPS: "steps",
    Phase.CONFIGS: "configurations",
    Phase.SCORING: "scoring (prompt rows)",
    Phase.STATUS: "status",
}


@dataclass(frozen=True)
class ProgressEvent:
    """``advance`` units of ``phase`` done (of ``total``, when known); ``start`` opens a new bar."""

    phase: Phase
    advance: int = 0
    total: Optional[int] = None
    start: bool = False
    message: Optional[str] = None


ProgressCallback = Callable[[ProgressEvent], None]


def emit(progress: ProgressCallback | None, event: ProgressEvent) -> None:
    """Send ``event`` to ``progress`` if there is one."""
    if progress is not None:
        progress(event)


def counter(progress: ProgressCallback | None, phase: Phase, total: int | None = None) -> Callable[[int], None] | None:
    """An ``advance(n)`` callback for code that counts units (``None`` without ``progress``)."""
    if progress is None:
        return None
    return lambda n: progress(ProgressEvent(phase, advance=n, total=total))
