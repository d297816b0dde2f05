"""ZsRE metrics: token-level teacher-forced top-1 accuracy (REFERENCE_NOTES §3.3).

For a prompt ``P`` and target ``T`` with ids ``y = tok(" " + T)`` (no special tokens), the row
``ids(P) + y`` is fed once and the argmax at every target position is read at the same time: the
prediction for ``y_j`` sits at position ``len(ids(P)) + j - 1``. Ids are concatenated, never decoded and
re-tokenised, so the official ``prompt + decode(y_<j)`` round trip (and Llama's double space) is avoided.

Specificity is reported two ways, because the paper and the official code disagree:

* ``specificity_vs_pre_edit`` — the paper's Eq. 39: agreement of the post-edit argmax with the PRE-edit
  model's argmax at the neighbour answer positions (both teacher-forced on the gold answer tokens).
  Needs a :class:`ZsreReference` from :func:`zsre_reference`, computed before editing.
* ``specificity_vs_gold`` — the official code: accuracy against the gold neighbour answer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..facts import Fact
from ..progress import ProgressCallback
from .scoring import map_target_log_probs, target_rows
from .counterfact import Summarised, mean_known

__all__ = [
    "ZsreRecord",
    "ZsreReference",
    "ZsreResult",
    "teacher_forced_argmax",
    "zsre_metrics",
    "zsre_reference",
]


@torch.no_grad()
def teacher_forced_argmax(
    loaded, pairs: Sequence[tuple[str, str]], batch_rows: int = 64, progress: ProgressCallback | None = None
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """For each ``(prompt, target)``: ``(argmax ids, target ids)``, both of length ``|tok(" "+target)|``.

    Identical pairs are computed once. One forward per row (prompt + full target).
    """
    unique = list(dict.fromkeys(pairs))
    rows, spans = target_rows(loaded, unique)
    preds = map_target_log_probs(loaded, rows, spans, lambda _, logp: tuple(logp.argmax(-1).tolist()), batch_rows,
                                 progress)
    found = {pair: (pred, span[1]) for pair, pred, span in zip(unique, preds, spans)}
    return [found[pair] for pair in pairs]


def _accuracy(pred: Sequence[int], want: Sequence[int]) -> float:
    return sum(int(a == b) for a, b in zip(pred, want, strict=True)) / len(want)


@dataclass(frozen=True)
class ZsreReference:
    """Pre-edit argmax ids at the neighbour answer positions: ``predictions[i][k]`` for fact ``i``'s
    neighbour ``k``, with the ``neighbors`` they were computed for (checked on use)."""

    neighbors: tuple[tuple[tuple[str, str], ...], ...]
    predictions: tuple[tuple[tuple[int, ...], ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZsreReference:
        return cls(
            neighbors=tuple(tuple(tuple(p) for p in ns) for ns in data["neighbors"]),
            predictions=tuple(tuple(tuple(p) for p in ps) for ps in data["predictions"]),
        )


def zsre_reference(loaded, facts: Sequence[Fact], batch_rows: int = 64) -> ZsreReference:
    """Run BEFORE editing: the unedited model's teacher-forced argmax on every neighbour answer."""
    pairs = [n for f in facts for n in f.neighbors]
    preds = iter(teacher_forced_argmax(loaded, pairs, batch_rows))
    return ZsreReference(
        neighbors=tuple(f.neighbors for f in facts),
        predictions=tuple(tuple(next(preds)[0] for _ in f.neighbors) for f in facts),
    )


@dataclass(frozen=True)
class ZsreRecord:
    """Per-record token accuracies in [0, 1]; ``None`` where the record has no such prompt (or no
    reference was given)."""

    fact_id: str | None
    efficacy: float
    generalization: float | None
    specificity_vs_gold: float | None
    specificity_vs_pre_edit: float | None


@dataclass(frozen=True)
class ZsreResult(Summarised):
    """Per-record rows and means over the records where each metric is defined."""

    records: tuple[ZsreRecord, ...]
    efficacy: float | None
    generalization: float | None
    specificity_vs_gold: float | None
    specificity_vs_pre_edit: float | None


def zsre_metrics(
    loaded, facts: Sequence[Fact], reference: ZsreReference | None = None, batch_rows: int = 64,
    progress: ProgressCallback | None = None,
) -> ZsreResult:
    """Efficacy (edit prompt → ``target``), generalization (mean over paraphrases) and both
    specificities (mean over neighbours), in one batched pass over all prompts of all facts.

    Without ``reference`` ``specificity_vs_pre_edit`` is ``None``. A reference computed for other
    facts raises ``ValueError``.
    """
    if reference is not None and reference.neighbors != tuple(f.neighbors for f in facts):
        raise ValueError("the ZsRE reference was computed for other facts (neighbour prompts differ)")
    pairs: list[tuple[str, str]] = []
    for f in facts:
        pairs.append((f.text, f.target))
        pairs.extend((p, f.target) for p in f.paraphrases)
        pairs.extend(f.neighbors)
    out = iter(teacher_forced_argmax(loaded, pairs, batch_rows, progress))
    records = []
    for i, f in enumerate(facts):
        eff = _accuracy(*next(out))
        para = [_accuracy(*next(out)) for _ in f.paraphrases]
        neigh = [next(out) for _ in f.neighbors]
        pre = None
        if reference is not None and neigh:
            pre = mean_known([_accuracy(pred, ref) for (pred, _), ref in zip(neigh, reference.predictions[i])])
        records.append(ZsreRecord(
            fact_id=f.id,
            efficacy=eff,
            generalization=mean_known(para),
            specificity_vs_gold=mean_known([_accuracy(*n) for n in neigh]),
            specificity_vs_pre_edit=pre,
        ))
    return ZsreResult(
        records=tuple(records),
        efficacy=mean_known([r.efficacy for r in records]),
        generalization=mean_known([r.generalization for r in records]),
        specificity_vs_gold=mean_known([r.specificity_vs_gold for r in records]),
        specificity_vs_pre_edit=mean_known([r.specificity_vs_pre_edit for r in records]),
    )
