"""Generation efficacy: does the model *say* the new object when it continues the prompt greedily?

Teacher-forced comparisons (``s(new) < s(true)``) overstate what a user sees: a fact can win the
probability comparison while greedy decoding still says something else ("The Mirage of Model
Editing", arXiv 2502.11177). This pass decodes each rewrite prompt and each paraphrase greedily for
as many tokens as the target needs (plus a small margin) and counts a hit when the continuation
begins with the target, compared case-insensitively with whitespace collapsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..facts import Fact
from .scoring import greedy_continuations

__all__ = ["GenerationRecord", "begins_with_target", "generation_efficacy", "spread_sample"]

_SPACE = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip().casefold()


def begins_with_target(continuation: str, target: str) -> bool:
    """``continuation`` starts with ``target`` (case-insensitive, runs of whitespace as one space) and
    the target ends at a word boundary, so "Englishman" does not count for "English"."""
    c, t = _norm(continuation), _norm(target)
    if not t or not c.startswith(t):
        return False
    rest = c[len(t):]
    return not rest or not (rest[0].isalnum() and t[-1].isalnum())


@dataclass(frozen=True)
class GenerationRecord:
    """One fact's greedy hits: the rewrite prompt (0/1) and the mean over its paraphrases (``None``
    without paraphrases); ``text`` is the rewrite prompt's continuation, for inspection."""

    fact_id: str | None
    efficacy: float
    generalization: float | None
    text: str


def spread_sample(n: int, limit: int | None) -> list[int]:
    """Indices of at most ``limit`` of ``n`` items, evenly spread over the whole range (so every
    editing cohort is represented); all of them when ``limit`` is ``None`` or ≥ n."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return sorted({(i * n) // limit for i in range(limit)})


def generation_efficacy(loaded, facts: Sequence[Fact], *, limit: int | None = None, margin_tokens: int = 2,
                        batch_rows: int = 32) -> dict[str, Any]:
    """Greedy generation efficacy and generalization of ``facts`` on the current model (fractions in
    [0, 1]). ``limit`` scores an evenly spread subset of that many facts (:func:`spread_sample`).
    Returns ``{"generation_efficacy", "generation_generalization", "n_records", "records"}``."""
    tok = loaded.tokenizer
    chosen = [facts[i] for i in spread_sample(len(facts), limit)]
    rows: list[list[int]] = []
    owners: list[tuple[int, bool]] = []  # (record, is the rewrite prompt)
    budgets: list[int] = []
    for r, f in enumerate(chosen):
        need = len(tok(" " + f.target.strip(), add_special_tokens=False)["input_ids"]) + margin_tokens
        for j, text in enumerate((f.text, *f.paraphrases)):
            rows.append(tok(text)["input_ids"])
            owners.append((r, j == 0))
            budgets.append(need)
    # one decoding length for all rows keeps the batches whole; a longer budget never changes a prefix
    outs = greedy_continuations(loaded, rows, max_new_tokens=max(budgets, default=1), batch_rows=batch_rows) if rows else []
    rewrite: dict[int, tuple[float, str]] = {}
    paras: dict[int, list[float]] = {}
    for (r, is_rewrite), out in zip(owners, outs):
        hit = float(begins_with_target(out, chosen[r].target))
        if is_rewrite:
            rewrite[r] = (hit, out)
        else:
            paras.setdefault(r, []).append(hit)
    records = [
        GenerationRecord(f.id, rewrite[r][0], (sum(paras[r]) / len(paras[r])) if paras.get(r) else None, rewrite[r][1])
        for r, f in enumerate(chosen)
    ]
    gens = [x.generalization for x in records if x.generalization is not None]
    return {
        "generation_efficacy": sum(x.efficacy for x in records) / len(records) if records else None,
        "generation_generalization": sum(gens) / len(gens) if gens else None,
        "n_records": len(records),
        "records": records,
    }
