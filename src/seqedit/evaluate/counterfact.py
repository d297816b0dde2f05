"""CounterFact metrics (ROME/MEMIT ``eval_utils_counterfact.py`` + ``summarize.py``, REFERENCE_NOTES §3.2).

Every prefix is scored against both targets with :func:`~seqedit.evaluate.scoring.score_targets`, whose
statistic ``s(T)`` is the length-normalised mean NLL of ``" " + T`` after the prefix (nats/token).
Comparisons are strict, as in the official code:

* efficacy: ``s(new) < s(true)`` on the rewrite prompt;
* generalization: mean over the record's paraphrases of ``s(new) < s(true)``;
* specificity: mean over its neighbour prompts of ``s(answer) < s(new)``, where ``answer`` is the
  neighbour's own answer (the true object in both layouts).

Probability margins use the geometric-mean per-token probability ``exp(-s(T))``; every margin is
``P(new) - P(true-or-neighbour answer)`` so that a *positive* value always means "the new target wins"
(good for efficacy/generalization, bad for specificity). Works for the KnowEdit layout (1 paraphrase,
1 neighbour) and the ROME layout (2 paraphrases, 10 neighbours) alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..facts import Fact
from ..progress import ProgressCallback
from .scoring import score_targets

__all__ = ["CounterFactRecord", "CounterFactResult", "Summarised", "counterfact_metrics", "mean_known"]


@dataclass(frozen=True)
class CounterFactRecord:
    """Metrics of one record. Indicators are in [0, 1]; margins are probabilities in [-1, 1].

    ``None`` means the record has no paraphrase (or no neighbour), so the metric is undefined for it.
    """

    fact_id: str | None
    efficacy: float
    generalization: float | None
    specificity: float | None
    rewrite_gm_prob_new_minus_true: float
    paraphrase_gm_prob_new_minus_true: float | None
    neighborhood_gm_prob_new_minus_answer: float | None


class Summarised:
    """For result dataclasses with a ``records`` tuple: :meth:`summary` without the per-record rows."""

    def summary(self) -> dict[str, Any]:
        """The means and counts, without per-record rows (JSON-safe)."""
        out = {k: v for k, v in asdict(self).items() if k != "records"}
        out["n_records"] = len(self.records)
        return out


@dataclass(frozen=True)
class CounterFactResult(Summarised):
    """Per-record metrics and their means over the records where each is defined (``None`` if none).

    ``n_skipped`` counts input facts without a ``true_target``, which CounterFact metrics need.
    """

    records: tuple[CounterFactRecord, ...]
    n_skipped: int
    efficacy: float | None
    generalization: float | None
    specificity: float | None
    rewrite_gm_prob_new_minus_true: float | None
    paraphrase_gm_prob_new_minus_true: float | None
    neighborhood_gm_prob_new_minus_answer: float | None



def mean_known(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not ``None`` (``None`` when there are none)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def counterfact_metrics(loaded, facts: Sequence[Fact], batch_rows: int = 64,
                        progress: ProgressCallback | None = None) -> CounterFactResult:
    """Score every prompt of every record in one batched, de-duplicated pass on the current model.

    ``loaded`` is a LoadedModel-like object (``.model``, ``.tokenizer``); ``batch_rows`` rows per forward;
    ``progress`` gets the pass's scoring bar.
    """
    usable = [f for f in facts if f.true_target is not None]
    # One score per distinct (prefix, target): neighbours and paraphrases repeat across records.
    index: dict[tuple[str, str], int] = {}

    def slot(prefix: str, target: str) -> tuple[str, str]:
        index.setdefault((prefix, target), len(index))
        return prefix, target

    plans = []
    for f in usable:
        rewrite = (slot(f.text, f.target), slot(f.text, f.true_target))
        paras = [(slot(p, f.target), slot(p, f.true_target)) for p in f.paraphrases]
        neigh = [(slot(p, f.target), slot(p, answer)) for p, answer in f.neighbors]
        plans.append((f, rewrite, paras, neigh))
    scores = score_targets(loaded, list(index), batch_rows=batch_rows, progress=progress)
    s = {pair: scores[i].mean_nll for pair, i in index.items()}

    def compare(new_pair, other_pair) -> tuple[float, float]:
        """(1[s(new) < s(other)], exp(-s(new)) - exp(-s(other)))."""
        a, b = s[new_pair], s[other_pair]
        return float(a < b), math.exp(-a) - math.exp(-b)

    records = []
    for f, rewrite, paras, neigh in plans:
        eff, eff_margin = compare(*rewrite)
        para = [compare(*p) for p in paras]
        # Specificity is won when the neighbour's answer beats the new target (strictly), so the
        # indicator is taken the other way round; the margin keeps the new-minus-answer sign.
        nb = [(float(s[ans] < s[new]), compare(new, ans)[1]) for new, ans in neigh]
        records.append(CounterFactRecord(
            fact_id=f.id,
            efficacy=eff,
            generalization=mean_known([x for x, _ in para]),
            specificity=mean_known([x for x, _ in nb]),
            rewrite_gm_prob_new_minus_true=eff_margin,
            paraphrase_gm_prob_new_minus_true=mean_known([m for _, m in para]),
            neighborhood_gm_prob_new_minus_answer=mean_known([m for _, m in nb]),
        ))
    return CounterFactResult(
        records=tuple(records),
        n_skipped=len(facts) - len(usable),
        efficacy=mean_known([r.efficacy for r in records]),
        generalization=mean_known([r.generalization for r in records]),
        specificity=mean_known([r.specificity for r in records]),
        rewrite_gm_prob_new_minus_true=mean_known([r.rewrite_gm_prob_new_minus_true for r in records]),
        paraphrase_gm_prob_new_minus_true=mean_known([r.paraphrase_gm_prob_new_minus_true for r in records]),
        neighborhood_gm_prob_new_minus_answer=mean_known([r.neighborhood_gm_prob_new_minus_answer for r in records]),
    )
