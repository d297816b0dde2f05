"""How the facts of a ledger hold up by when they were edited: edit metrics by cohort on its final model.

A results folder's final metrics average over all facts; whether a shortfall is the aim of each edit
(every cohort low) or forgetting (old cohorts low, new ones high) needs them by editing order. This
reopens a ledger on its base model (``Editor.from_ledger``: the ledger's weights restored), takes its
facts in force in the order they were edited, scores them with the evaluation's own metrics
(``evaluate.measure.edit_summary``: CounterFact's NLL comparisons or ZsRE's token accuracy; with
``--chat`` also through the chat template) and prints the means over consecutive cohorts:

    python benchmarks/ledger_cohorts.py LEDGER --dataset zsre [--cohort 100] [--chat] [--json OUT]

ZsRE specificity against the unedited model needs that model's predictions (the results folder's
reference) and is left out here; ``specificity_vs_gold`` is kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from seqedit.cli.common import progress_bars
from seqedit.editor import Editor
from seqedit.evaluate.chat import chat_metrics
from seqedit.evaluate.measure import References, cohort_means, edit_summary


def _pct(x: float | None) -> str:
    """A rate ×100, or "–" where no fact of the cohort defines it (no paraphrase, say)."""
    return "–" if x is None else f"{100 * x:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ledger", type=Path)
    ap.add_argument("--dataset", choices=("counterfact", "zsre"), required=True)
    ap.add_argument("--cohort", type=int, default=100, help="facts per cohort (default: one step of 100)")
    ap.add_argument("--chat", action="store_true", help="also score the facts through the chat template")
    ap.add_argument("--batch-rows", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.cohort <= 0:
        ap.error(f"--cohort must be positive, got {a.cohort}")
    with Editor.from_ledger(a.ledger) as editor, torch.no_grad(), progress_bars() as progress:
        facts = editor.facts_in_force()
        steps = editor.ledger.last_step
        bare = edit_summary(editor.loaded, a.dataset, facts, References(None, None), a.batch_rows, cohort=a.cohort,
                            progress=progress)
        chat = cohort_means(chat_metrics(editor.loaded, facts, a.batch_rows).records, a.cohort) if a.chat else None
    out = {"ledger": str(a.ledger), "dataset": a.dataset, "facts": len(facts), "steps": steps,
           "efficacy": bare["efficacy"], "generalization": bare["generalization"],
           "by_cohort": bare["by_cohort"], "chat_by_cohort": chat}
    print(f"{len(facts)} facts after {steps} steps; bare efficacy {100 * bare['efficacy']:.1f}, "
          f"generalization {100 * bare['generalization']:.1f}")
    print(f"{'facts':>12} {'Eff.':>6} {'Gen.':>6}" + (f" {'chat Eff.':>9} {'chat Gen.':>9}" if chat else ""))
    for i, c in enumerate(bare["by_cohort"]):
        line = f"{c['facts'][0]:>5}–{c['facts'][1]:<6} {_pct(c['efficacy']):>6} {_pct(c['generalization']):>6}"
        if chat:
            line += f" {_pct(chat[i]['efficacy']):>9} {_pct(chat[i]['generalization']):>9}"
        print(line)
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
