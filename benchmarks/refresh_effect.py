"""What `seqedit refresh` costs and what it does (issue 30, step 4): a ledger's facts by cohort and the
model's drift, before and after one budgeted refresh.

The ledger is copied first (``--work``), so the run that made it keeps its record. Measured on the copy,
before and after :func:`seqedit.refresh.refresh` (``--max-facts``, oldest faded facts first):
CounterFact efficacy / generalization / specificity of all facts in force, by cohort of ``--cohort``
facts in editing order, and WikiText-2 perplexity and top-1 agreement with the unedited model (the
references are computed on the base weights, as the sweep's). The refresh report gives its cost (seconds
per phase: scoring, re-editing, the recheck) and how many re-edited facts still fade.

    python benchmarks/refresh_effect.py LEDGER --work /tmp/refresh --max-facts 200 --out docs/results/refresh/s30-base.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from seqedit.atomic import atomic_write_json
from seqedit.editor import Editor
from seqedit.evaluate.measure import References, drift_summary, edit_summary
from seqedit.refresh import refresh


def _measure(editor: Editor, refs: References, cohort: int) -> dict:
    facts = editor.facts_in_force()
    t = time.perf_counter()
    edit = edit_summary(editor.loaded, "counterfact", facts, refs, 64, cohort=cohort)
    drift = drift_summary(editor.loaded, refs)
    return {"facts": len(facts), **{k: edit[k] for k in ("efficacy", "generalization", "specificity")},
            "by_cohort": edit["by_cohort"], "ppl": drift["ppl"], "top1_agreement": drift["agreement"],
            "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ledger", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="where the ledger is copied (must not exist)")
    ap.add_argument("--max-facts", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--cohort", type=int, default=500)
    ap.add_argument("--drift-windows", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    shutil.copytree(a.ledger, a.work)
    with Editor.from_ledger(a.work) as editor, torch.no_grad():
        facts = editor.facts_in_force()
        live = {l: editor.loaded.adapter.weight(l).detach().clone() for l in editor.hparams.layers}
        for l in editor.hparams.layers:  # the references are the unedited model's
            editor.loaded.adapter.set_weight(l, editor.w0[l])
        refs = References.compute(editor.loaded, "counterfact", facts, 256, a.drift_windows, 64)
        for l, w in live.items():
            editor.loaded.adapter.set_weight(l, w)
        before = _measure(editor, refs, a.cohort)
        print(json.dumps({k: v for k, v in before.items() if k != "by_cohort"}), flush=True)
    with Editor.from_ledger(a.work) as editor:
        t = time.perf_counter()
        report = refresh(editor, max_facts=a.max_facts, batch_size=a.batch_size)
        seconds = time.perf_counter() - t
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "refreshed"}), flush=True)
        with torch.no_grad():
            after = _measure(editor, refs, a.cohort)
        print(json.dumps({k: v for k, v in after.items() if k != "by_cohort"}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, {"ledger": str(a.ledger), "max_facts": a.max_facts, "batch_size": a.batch_size,
                              "before": before, "refresh": {**report.to_dict(), "wall_seconds": seconds},
                              "after": after})


if __name__ == "__main__":
    main()
