"""Which records an evaluation edits: a seeded shuffle of a dataset file, not its first N.

``select_facts`` loads every usable record of the source, shuffles the indices with
``random.Random(seed)`` and keeps the first ``n`` (the order is the editing order). Facts without an
id get a stable one from their line number (``zsre-<line>``), so results can name every record.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SeqEditError
from ..datasets import load_facts
from ..facts import Fact
from ..shared_data import counterfact_path, zsre_path

__all__ = ["DATASETS", "Selection", "select_facts"]

DATASETS = ("counterfact", "zsre")


@dataclass(frozen=True)
class Selection:
    facts: list[Fact]
    source: str
    n_available: int
    seed: int
    skipped_same_slot: tuple[str, ...] = ()  # ids passed over because their slot was already selected

    def to_dict(self) -> dict[str, Any]:
        out = {
            "source": self.source,
            "n_available": self.n_available,
            "n": len(self.facts),
            "seed": self.seed,
            "method": "random.Random(seed).shuffle of the record indices, first n kept, in that order",
            "fact_ids": [f.id for f in self.facts],
        }
        if self.skipped_same_slot:
            out["method"] += " (one record per slot: later records of a selected (subject, prompt) passed over)"
            out["skipped_same_slot"] = list(self.skipped_same_slot)
        return out


def source_path(dataset: str, layout: str = "knowedit", zsre_file: str = "mend-eval", path: str | None = None) -> Path:
    """The file to draw from: ``path`` if given, else the shared CounterFact (``layout``) or ZsRE file."""
    if dataset not in DATASETS:
        raise SeqEditError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if path is not None:
        return Path(path)
    return counterfact_path(layout) if dataset == "counterfact" else zsre_path(zsre_file)


@functools.lru_cache(maxsize=4)
def _pool(path: str, mtime_ns: int, size: int, split: str | None, zsre_target: str) -> tuple[Fact, ...]:
    """Every record of ``path`` (facts are immutable, so one parse per file version is shared)."""
    return tuple(load_facts(path, split=split, zsre_target=zsre_target))


def select_facts(
    dataset: str,
    n: int,
    seed: int,
    *,
    layout: str = "knowedit",
    split: str | None = None,
    zsre_file: str = "mend-eval",
    zsre_target: str = "answers",
    path: str | None = None,
    unique_slots: bool = False,
) -> Selection:
    """``n`` facts of ``dataset`` drawn by a seeded shuffle. ``split`` (CounterFact) restricts the pool
    first; ``zsre_target`` picks the ZsRE convention (``answers[0]``, ROME/MEMIT, or ``alt``, EasyEdit).
    ``unique_slots`` passes over a record whose (subject, prompt) slot is already selected (CounterFact
    has multi-valued relations such as twin cities, which a ledger treats as replacements)."""
    if n < 1:
        raise SeqEditError(f"n must be >= 1, got {n}")
    src = source_path(dataset, layout, zsre_file, path)
    if not src.is_file():
        raise SeqEditError(f"{dataset} source {src} does not exist")
    if split is not None and dataset != "counterfact":
        raise SeqEditError(f"split={split!r} applies to CounterFact only")
    stat = src.stat()
    facts = list(_pool(str(src), stat.st_mtime_ns, stat.st_size, split, zsre_target))
    if dataset == "counterfact" and not all(f.true_target for f in facts):
        raise SeqEditError(f"{src}: CounterFact records need a true target (ground_truth / target_true)")
    if len(facts) < n:
        raise SeqEditError(f"{src} has {len(facts)} usable records{f' in split {split!r}' if split else ''}, fewer than n={n}")
    prefix = "zsre" if dataset == "zsre" else "cf"
    facts = [f if f.id else f.with_id(f"{prefix}-{f.meta.get('record', i + 1)}") for i, f in enumerate(facts)]
    order = list(range(len(facts)))
    random.Random(seed).shuffle(order)
    if not unique_slots:
        return Selection([facts[i] for i in order[:n]], str(src), len(facts), seed)
    chosen, skipped, slots = [], [], set()
    for i in order:
        if len(chosen) == n:
            break
        slot = (facts[i].subject, facts[i].prompt)
        (skipped if slot in slots else chosen).append(facts[i])
        slots.add(slot)
    if len(chosen) < n:
        raise SeqEditError(f"{src} has {len(chosen)} records with distinct (subject, prompt) slots"
                           f"{f' in split {split!r}' if split else ''}, fewer than n={n}")
    return Selection(chosen, str(src), len(facts), seed, tuple(f.id for f in skipped))
