"""What the report reads from ``results.json`` (typed: :mod:`seqedit.evaluate.schema`): the metrics per
dataset, their short names, the configurations by method and alignment, and the value getters the
tables and plots share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .evaluate.schema import (ConfigEntry, DriftSummary, EditMetrics, GeneralSummary, ResultsFile, RetentionPoint,
                              read_results)

__all__ = ["EDIT_METRICS", "SHORT_NAMES", "Getter", "StepPoint", "as_results", "cohort_points", "config_rows",
           "drift_metric", "edit_metric", "f1", "generation_efficacy", "load_results", "of_drift", "of_edit", "of_f1",
           "step_points"]

EDIT_METRICS = {
    "counterfact": ("efficacy", "generalization", "specificity"),
    "zsre": ("efficacy", "generalization", "specificity_vs_pre_edit", "specificity_vs_gold"),
}
SHORT_NAMES = {"efficacy": "Eff.", "generalization": "Gen.", "specificity": "Spe.", "specificity_vs_pre_edit":
          "Spe. (vs pre-edit)", "specificity_vs_gold": "Spe. (vs gold)", "fluency": "Flu.", "consistency": "Consis."}

# A value of one measurement: of a FinalMetrics or Baseline, and (general and drift getters) of a CurvePoint.
Getter = Callable[[Any], Optional[float]]


def load_results(folder: str | Path) -> ResultsFile:
    """``folder/results.json``, validated (:class:`~seqedit.evaluate.schema.ResultsFileError` names a bad key)."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {folder}")
    return read_results(path)


def as_results(data: ResultsFile | Mapping[str, Any]) -> ResultsFile:
    """``data`` typed: a :class:`ResultsFile` as it is, a results.json dict validated."""
    return data if isinstance(data, ResultsFile) else ResultsFile.from_dict(data)


def config_rows(data: ResultsFile, running: bool = False) -> dict[tuple[str, str], dict[str, ConfigEntry]]:
    """``{(method, alignment): {"se": entry, "ote": entry}}`` of the completed configurations, and with
    ``running`` also of those still running that have points along the run (a checkpointed run saves
    them after every step)."""
    out: dict[tuple[str, str], dict[str, ConfigEntry]] = {}
    for label, e in data.configs.items():
        going = running and e.status == "running" and bool(e.retention or e.curve)
        if e.status == "done" or going:
            m, a, mode = label.split("/")
            out.setdefault((m, a), {})[mode] = e
    return out


def cohort_points(se: ConfigEntry) -> list[RetentionPoint]:
    """The retention points of an SE entry that carry per-cohort means, in order of edits."""
    return sorted((p for p in se.retention if p.by_cohort), key=lambda p: p.edits)


def edit_metric(edit: EditMetrics | None, name: str, chat: bool = False) -> float | None:
    """Edit metric ``name`` (a fraction) of ``edit``, or of its chat-template metrics with ``chat``."""
    holder = edit.chat if chat and edit is not None else edit
    return None if holder is None else holder.metric(name)


def f1(general: GeneralSummary | None, task: str | None = None) -> float | None:
    """The weighted F1 of general ``task``, or without one the mean F1 over the tasks."""
    if general is None:
        return None
    if task is None:
        return general.mean_f1
    score = general.tasks.get(task)
    return None if score is None else score.f1


def drift_metric(drift: DriftSummary | None, name: str) -> float | None:
    """``ppl`` or top-1 ``agreement`` of a drift measurement."""
    return None if drift is None else drift.metric(name)


def of_edit(name: str, chat: bool = False) -> Getter:
    return lambda m: edit_metric(m.edit, name, chat)


def of_f1(task: str | None = None) -> Getter:
    return lambda m: f1(m.general, task)


def of_drift(name: str) -> Getter:
    return lambda m: drift_metric(m.drift, name)


def generation_efficacy(edit: EditMetrics | None) -> float | None:
    """The share of greedy continuations that begin with the target (``None`` where not measured)."""
    gen = None if edit is None else edit.generation
    return None if gen is None else gen.generation_efficacy


@dataclass(frozen=True)
class StepPoint:
    """After a step that brought the facts edited to ``edits``: ‖W_ℓ − W₀,ℓ‖_F per edited layer (``drift``,
    keys ``str(ℓ)``), as the step recorded it."""

    edits: int
    drift: Mapping[str, float | None]

    @property
    def largest(self) -> float | None:
        values = [v for v in self.drift.values() if v is not None]
        return max(values) if values else None


def step_points(entry: ConfigEntry, batch_size: int | None) -> list[StepPoint]:
    """The weight drift after every step of ``entry`` that recorded it; edits count each step's facts
    (``n_facts``, else ``batch_size``)."""
    out, edits = [], 0
    for s in entry.steps:
        edits += s.n_facts if s.n_facts is not None else (batch_size or 0)
        if s.drift_norms:
            out.append(StepPoint(edits, s.drift_norms))
    return out
