"""Refresh: re-edit the facts in force that no longer win on the current model (issue 30, step 4).

Why. Over thousands of sequential steps older facts fade (the 9,900-edit run: the oldest quarter at
64 % efficacy, the newest at 79 %): their constraints still hold the keys and the values they had when
they were written, while later edits moved the layers below and above them. A fact's stored
constraint is then aimed at a model that no longer exists.

How. :func:`refresh` scores every fact in force on the current model (:func:`winning`), takes the
faded ones oldest first and applies them again in ledger steps of ``batch_size``: each step optimises
their values anew on the current model, and since a fact holds its slot, the ledger's conflict replace
removes its old constraint exactly and adds the new one (the weights stay the one-time solution of
the facts in force). A refresh is budgeted (``max_facts``, ``max_seconds``, checked before each step
with the last step's cost) and resumable: every step is committed as it ends, and a second run
re-scores and goes on with what still fades.

A fact *wins* in a prompt format when its target is the argmax continuation at every target token
of its rewrite prompt (``"most_probable"``, the value optimisation's stop rule), or when its target
is more likely than its true answer, CounterFact's efficacy (``"vs_true"``; facts without a true
answer fall back to the first). With a ``both`` ledger it must win in both formats.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import SeqEditError
from .evaluate.scoring import TargetScore, map_target_log_probs, target_rows, target_score
from .facts import Fact
from .locate.chat import answer_ids, chat_ids, formats, question_template
from .progress import Phase, ProgressCallback, ProgressEvent, emit

if TYPE_CHECKING:
    from .editor import Editor

__all__ = ["CRITERIA", "RefreshReport", "refresh", "winning"]

CRITERIA = ("most_probable", "vs_true")


@dataclass
class RefreshReport:
    """What a refresh did: facts scored, faded, re-edited (ids, oldest first) and the ledger steps it
    committed; ``still_faded`` counts the re-edited facts that do not win afterwards (``None``
    unrechecked); ``stopped`` is ``"done"``, ``"max_facts"`` or ``"max_seconds"``; seconds per phase."""

    in_force: int
    faded: int
    refreshed: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    still_faded: int | None = None
    stopped: str = "done"
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"in_force": self.in_force, "faded": self.faded, "refreshed": list(self.refreshed),
                "steps": list(self.steps), "still_faded": self.still_faded, "stopped": self.stopped,
                "seconds": dict(self.seconds)}


def _scores(loaded, facts: Sequence[Fact], fmt: str, answer: str, batch_rows: int) -> list[TargetScore]:
    """``answer`` (``"target"`` or ``"true_target"``) scored after each fact's rewrite prompt in ``fmt``."""
    tok = loaded.tokenizer
    if fmt == "bare":
        rows, spans = target_rows(loaded, [(f.text, getattr(f, answer)) for f in facts])
    else:
        rows, spans = [], []
        for f in facts:
            prompt = chat_ids(tok, question_template(f.text))
            t = answer_ids(tok, "chat", getattr(f, answer))
            rows.append(prompt + list(t))
            spans.append((len(prompt), t))
    return map_target_log_probs(loaded, rows, spans, lambda i, lp: target_score(spans[i][1], lp), batch_rows)


@torch.no_grad()
def winning(loaded, facts: Sequence[Fact], prompt_format: str = "bare", criterion: str = "most_probable",
            batch_rows: int = 64) -> list[bool]:
    """Whether each fact wins on the current model in every format of ``prompt_format`` (module docstring)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    wins = [True] * len(facts)
    for fmt in formats(prompt_format):
        new = _scores(loaded, facts, fmt, "target", batch_rows)
        rival_of = [i for i, f in enumerate(facts) if criterion == "vs_true" and f.true_target is not None]
        rivals = dict(zip(rival_of, _scores(loaded, [facts[i] for i in rival_of], fmt, "true_target", batch_rows)))
        for i, s in enumerate(new):
            won = s.mean_nll < rivals[i].mean_nll if i in rivals else s.exact
            wins[i] = wins[i] and won
    return wins


def refresh(editor: Editor, *, max_facts: int | None = None, max_seconds: float | None = None,
            batch_size: int = 100, criterion: str = "most_probable", recheck: bool = True,
            batch_rows: int = 64, progress: ProgressCallback | None = None) -> RefreshReport:
    """Re-edit the faded facts of ``editor``'s ledger, oldest first, in committed steps of ``batch_size``
    (module docstring). Refuses an editor without a ledger or whose form cannot replace a fact exactly."""
    if editor.ledger is None:
        raise SeqEditError("refresh re-edits the facts of a ledger: open the editor with ledger=… or Editor.from_ledger")
    if editor.spec.capabilities.removal == "none":
        raise SeqEditError(f"{editor.spec.label} cannot replace a fact's constraint exactly, so a refresh would add "
                           "a second constraint beside the faded one; use an exact form (e.g. memit/aligned)")
    if batch_size < 1 or (max_facts is not None and max_facts < 0) or (max_seconds is not None and max_seconds < 0):
        raise ValueError(f"batch_size must be >= 1 and max_facts, max_seconds >= 0, got {batch_size}, "
                         f"{max_facts}, {max_seconds}")
    if criterion not in CRITERIA:  # before the scoring pass, which takes minutes on a large ledger
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    t0 = time.perf_counter()
    rows = sorted(editor.ledger.in_force(), key=lambda r: (r.added, r.row))
    facts = [r.fact for r in rows]
    wins = winning(editor.loaded, facts, editor.prompt_format, criterion, batch_rows) if facts else []
    faded = [f for f, w in zip(facts, wins) if not w]
    report = RefreshReport(in_force=len(facts), faded=len(faded), seconds={"check": time.perf_counter() - t0})
    todo = faded if max_facts is None else faded[:max_facts]
    if max_facts is not None and len(faded) > max_facts:
        report.stopped = "max_facts"
    t1 = time.perf_counter()
    n_steps = -(-len(todo) // batch_size)
    emit(progress, ProgressEvent(Phase.STEPS, total=n_steps, start=True))
    last = 0.0
    for lo in range(0, len(todo), batch_size):
        spent = time.perf_counter() - t0
        if max_seconds is not None and spent + last > max_seconds:
            report.stopped = "max_seconds"
            break
        t = time.perf_counter()
        batch = todo[lo:lo + batch_size]
        editor.apply(batch, progress)
        last = time.perf_counter() - t
        report.refreshed += [f.id for f in batch]
        report.steps.append(editor.last_record.id)
        emit(progress, ProgressEvent(Phase.STEPS, advance=1, total=n_steps))
    report.seconds["edit"] = time.perf_counter() - t1
    if recheck and report.refreshed:
        t2 = time.perf_counter()
        done = set(report.refreshed)
        again = winning(editor.loaded, [f for f in faded if f.id in done], editor.prompt_format, criterion, batch_rows)
        report.still_faded = sum(not w for w in again)
        report.seconds["recheck"] = time.perf_counter() - t2
    report.seconds["total"] = time.perf_counter() - t0
    return report
