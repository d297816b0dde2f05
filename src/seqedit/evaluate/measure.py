"""One evaluation pass of the current model, as JSON-safe summaries with timings.

Wraps the metric modules for the runner: edit metrics (CounterFact or ZsRE) on a list of facts, the
general-capability tasks, WikiText-2 drift and CounterFact fluency. Each returns a plain dict whose
``seconds`` is the wall time of that pass; the pre-edit references (:class:`References`) are computed
once on the unedited model and stored beside ``results.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_json
from ..facts import Fact
from ..progress import ProgressCallback
from .chat import chat_metrics
from .counterfact import counterfact_metrics
from .drift import DriftReference, drift_metrics, drift_reference
from .general import general_metrics
from .general_gen import general_metrics_generation
from .zsre import ZsreReference, zsre_metrics, zsre_reference

__all__ = ["References", "cohort_means", "drift_summary", "edit_summary", "general_summary"]

DRIFT_FILE, ZSRE_FILE = "reference_drift.npz", "reference_zsre.json"


@dataclass
class References:
    """Pre-edit data the post-edit metrics compare against (``None`` where that metric is off)."""

    drift: DriftReference | None
    zsre: ZsreReference | None

    @classmethod
    def compute(cls, loaded, dataset: str, facts: Sequence[Fact], drift_window: int, drift_windows: int,
                batch_rows: int) -> References:
        drift = drift_reference(loaded, drift_window, drift_windows) if drift_windows > 0 else None
        zsre = zsre_reference(loaded, facts, batch_rows) if dataset == "zsre" else None
        return cls(drift, zsre)

    def save(self, folder: Path) -> None:
        if self.drift is not None:
            self.drift.save(folder / DRIFT_FILE)
        if self.zsre is not None:
            atomic_write_json(folder / ZSRE_FILE, self.zsre.to_dict())

    @classmethod
    def load(cls, folder: Path, dataset: str, drift_windows: int) -> References | None:
        """The saved references, or ``None`` if one that the settings need is missing."""
        drift_path, zsre_path = folder / DRIFT_FILE, folder / ZSRE_FILE
        if (drift_windows > 0 and not drift_path.is_file()) or (dataset == "zsre" and not zsre_path.is_file()):
            return None
        drift = DriftReference.load(drift_path) if drift_windows > 0 else None
        zsre = ZsreReference.from_dict(json.loads(zsre_path.read_text("utf-8"))) if dataset == "zsre" else None
        return cls(drift, zsre)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


_COHORT_METRICS = ("efficacy", "generalization", "specificity", "specificity_vs_gold", "specificity_vs_pre_edit")


def cohort_means(records: Sequence[Any], size: int) -> list[dict[str, Any]]:
    """Each metric's mean over consecutive blocks of ``size`` records, in editing order:
    ``[{"facts": [first, last], "efficacy": mean, ...}]`` (1-based, inclusive; the last block may be
    shorter; a mean is ``None`` where no record of the block defines the metric). With ``size`` the
    facts edited between two retention points, block b says how the facts edited in that stretch of
    the run hold up on the current model: retention of early edits against late ones."""
    if size <= 0:
        raise ValueError(f"cohort size must be positive, got {size}")
    names = [m for m in _COHORT_METRICS if records and hasattr(records[0], m)]
    out = []
    for start in range(0, len(records), size):
        block = records[start:start + size]
        means = {}
        for m in names:
            kept = [getattr(r, m) for r in block if getattr(r, m) is not None]
            means[m] = sum(kept) / len(kept) if kept else None
        out.append({"facts": [start + 1, start + len(block)], **means})
    return out


def edit_summary(loaded, dataset: str, facts: Sequence[Fact], refs: References, batch_rows: int,
                 chat: bool = False, cohort: int | None = None,
                 progress: ProgressCallback | None = None) -> dict[str, Any]:
    """CounterFact or ZsRE metrics of ``facts`` (means, ``n_records``), timing and throughput. ``facts``
    must be a prefix of the facts the references were computed for. With ``chat``, ``"chat"`` holds the
    same facts' metrics through the chat template (:mod:`seqedit.evaluate.chat`); with ``cohort``,
    ``"by_cohort"`` holds the means over each block of that many facts (:func:`cohort_means`); ``progress``
    gets the bare scoring pass's bar."""
    t = time.perf_counter()
    if dataset == "counterfact":
        result = counterfact_metrics(loaded, facts, batch_rows, progress)
    else:
        ref = refs.zsre
        if ref is not None:  # retention scores a prefix of the selected facts
            k = len(facts)
            ref = ZsreReference(ref.neighbors[:k], ref.predictions[:k])
        result = zsre_metrics(loaded, facts, ref, batch_rows, progress)
    res = result.summary()
    if cohort:
        res["by_cohort"] = cohort_means(result.records, cohort)
    if chat:
        t_chat = time.perf_counter()
        res["chat"] = {**chat_metrics(loaded, facts, batch_rows).summary(), "seconds": time.perf_counter() - t_chat}
    secs = time.perf_counter() - t
    return {**res, "seconds": secs, "records_per_second": len(facts) / secs if secs > 0 else None}


def general_summary(
    loaded, tasks: Sequence[str], n: int, scoring: str, official_rte_inversion: bool, batch_rows: int
) -> dict[str, Any] | None:
    """The general tasks on items 10..10+n−1 each; per-task accuracy / weighted F1 / MCC and their means."""
    if n <= 0 or not tasks:
        return None
    t = time.perf_counter()
    if scoring == "likelihood":
        res = general_metrics(loaded, tasks, 10, 10 + n, official_rte_inversion=official_rte_inversion,
                              batch_rows=batch_rows)
    else:
        res = general_metrics_generation(loaded, tasks, 10, 10 + n, official_rte_inversion=official_rte_inversion,
                                         batch_rows=max(1, batch_rows // 2))
    per = {k: {"accuracy": r.accuracy, "f1": r.f1, "mcc": r.mcc, "n": r.n} for k, r in res.items()}
    means = {f"mean_{m}": float(np.mean([p[m] for p in per.values()])) for m in ("accuracy", "f1", "mcc")}
    return {"scoring": scoring, "tasks": per, **means, "seconds": time.perf_counter() - t}


def drift_summary(loaded, refs: References, batch_rows: int = 8) -> dict[str, Any] | None:
    """WikiText-2 test perplexity and top-1 agreement with the unedited model."""
    if refs.drift is None:
        return None
    t = time.perf_counter()
    r = drift_metrics(loaded, refs.drift, batch_rows)
    return {"ppl": _finite(r.ppl), "mean_nll": r.mean_nll, "agreement": r.agreement, "n_tokens": r.n_tokens,
            "seconds": time.perf_counter() - t}
