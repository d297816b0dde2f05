"""The ceiling of the objective: one-time editing of N facts from the base weights, values on the unedited model.

Issue 30, step 1. The real sequential protocol optimises each step's values on the already edited
model. The one-time (batch) solution of the same objective optimises every value on the *unedited*
model and solves once from W₀. If the one-time solution drifts as much as the sequential run at the
same N, the limit is the objective's capacity (λΣ₀ + KKᵀ, d_in = 1,536, 7 layers); if it drifts much
less, the limit is the sequential process.

The facts are those of the 10,000-edit run (`docs/results/cf-10000`): CounterFact `edit` split,
seed 0, one fact per (subject, prompt) slot, the `long-run` preset with continuation KL off and float32
values (as that run), so the first N facts here are the first N facts the sequential run edited.

Resumable at two grains: each chunk of values is cached under ``$SEQEDIT_CACHE/frozen`` (a killed
run re-optimises at most one chunk) and each N's measurement is written to ``OUT/results.json`` as it
finishes (a finished N is skipped on restart). Values are computed in editing order and each N is
measured as soon as its facts have values, so the small N's arrive first.

    python benchmarks/ceiling.py --out docs/results/ceiling --ns 1000,2500,5000,7500,9900

Step 5 (widen the memory): ``--layers 0-10`` edits that span instead of the preset's 4–10, with the same
z-layer and so the same (cached) values: only the capacity differs. Its points go to
``one_time_layers/<span>`` in the same results file.

    python benchmarks/ceiling.py --out docs/results/ceiling --ns 2500 --layers 0-10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from seqedit.atomic import atomic_write_json
from seqedit.editor import Editor
from seqedit.evaluate.drift import drift_reference
from seqedit.evaluate.generation_efficacy import generation_efficacy
from seqedit.evaluate.measure import References, cohort_means, drift_summary
from seqedit.evaluate.counterfact import counterfact_metrics
from seqedit.evaluate.schema import DriftSummary, EditMetrics, read_results
from seqedit.evaluate.selection import select_facts
from seqedit.locate.frozen import frozen_targets
from seqedit.locate.templates import context_templates
from seqedit.locate.values import ValueResult
from seqedit.models.load import load_model
from seqedit.models.presets import preset_for

SEQUENTIAL = Path(__file__).resolve().parents[1] / "docs/results/cf-10000"


def concat(parts: list[Any]) -> ValueResult:
    return ValueResult(
        z=torch.cat([p.z for p in parts], dim=1), h0=torch.cat([p.h0 for p in parts], dim=1),
        steps=[s for p in parts for s in p.steps], loss=[x for p in parts for x in p.nll],
        nll=[x for p in parts for x in p.nll],
    )


def sequential_points() -> dict[int, dict[str, Any]]:
    """The real-protocol run's measurements at its edit counts (retention points and final)."""
    def row(edit: EditMetrics, drift: DriftSummary | None) -> dict[str, Any]:
        return {"efficacy": edit.efficacy, "generalization": edit.generalization, "specificity": edit.specificity,
                "drift": None if drift is None else drift.to_dict()}

    out: dict[int, dict[str, Any]] = {}
    for name in ("memit-aligned", "memit-aligned-final"):
        path = SEQUENTIAL / name / "results.json"
        if not path.is_file():
            continue
        cfg = read_results(path).configs["memit/aligned/se"]
        drift = {c.edits: c.drift for c in cfg.curve}
        for r in cfg.retention:
            out[r.edits] = row(r, drift.get(r.edits))
        final = cfg.final
        if final is not None and final.edit is not None and cfg.edited:
            out[cfg.edited] = row(final.edit, final.drift)
    return out


def measure(lm, facts, refs: References, base: dict[int, torch.Tensor], layers, gen_limit: int) -> dict[str, Any]:
    t = time.perf_counter()
    cf = counterfact_metrics(lm, facts, 64)
    summary = cf.summary()
    summary.pop("records", None)
    out: dict[str, Any] = {"edit": summary, "by_cohort": cohort_means(cf.records, 2500)}
    out["drift"] = drift_summary(lm, refs)
    gen = generation_efficacy(lm, facts, limit=gen_limit)
    out["generation"] = {k: gen[k] for k in ("generation_efficacy", "generation_generalization", "n_records")}
    out["delta_w_fro"] = {str(l): float((lm.adapter.weight(l).double() - base[l].double()).norm()) for l in layers}
    out["w0_fro"] = {str(l): float(base[l].double().norm()) for l in layers}
    out["seconds_measure"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ns", default="1000,2500,5000,7500,9900")
    ap.add_argument("--chunk", type=int, default=100, help="facts per cached value chunk")
    ap.add_argument("--gen-limit", type=int, default=1000, help="facts whose greedy generations are scored")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--layers", default="", help="edited span LO-HI ending at the preset's z-layer (default: the preset's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = sorted(int(x) for x in args.ns.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results: dict[str, Any] = json.loads(res_path.read_text()) if res_path.is_file() else {}
    lm = load_model("smollm2-135m")
    # float32 values in chunks of 50, as the sequential run compared with (made before issue 34's bfloat16
    # preset) and as the cached values of the published points (the chunk size is part of the cache key)
    hp = preset_for(lm.name, lm.adapter.n_layers).override(continuation_kl=0.0, v_compute_dtype="float32",
                                                           v_batch_facts=50).for_formats(1)
    edit_hp, where = hp, results.setdefault("one_time", {})
    if args.layers:  # the values stay those of the preset (same z-layer): only the edited span changes
        lo, _, hi = args.layers.partition("-")
        span = tuple(range(int(lo), int(hi) + 1))
        if span[-1] != hp.z_layer:
            raise SystemExit(f"--layers must end at the preset's z-layer {hp.z_layer}, got {args.layers}")
        edit_hp = hp.override(layers=span)
        where = results.setdefault("one_time_layers", {}).setdefault(args.layers, {})
    sel = select_facts("counterfact", max(ns), 0, split="edit", unique_slots=True)
    facts = sel.facts
    base = {l: lm.adapter.weight(l).detach().clone() for l in edit_hp.layers}
    templates = context_templates(lm, hp.n_context_templates, hp.context_template_len, hp.template_seed)
    refs_dir = out / "refs"
    refs = References.load(refs_dir, "counterfact", 32)
    if refs is None:
        refs = References(drift_reference(lm, 256, 32), None)
        refs_dir.mkdir(exist_ok=True)
        refs.save(refs_dir)
    results.update({"hparams": hp.to_dict(), "selection": {k: v for k, v in sel.to_dict().items() if k != "facts"},
                    "protocol": "one-time: values optimised on the unedited model per chunk, one solve from W0 "
                                "with keys read layer by layer (MEMIT's one-time edit)",
                    "pre_edit_ppl": refs.drift.ppl,
                    "sequential": {str(k): v for k, v in sorted(sequential_points().items())}})
    atomic_write_json(res_path, results)

    parts: list[Any] = []
    t_values = 0.0
    for n in ns:
        if str(n) in where:
            continue
        while sum(p.n for p in parts) < n:
            lo = sum(p.n for p in parts)
            hi = min(lo + args.chunk, len(facts))
            t = time.perf_counter()
            parts.append(frozen_targets(lm, facts[lo:hi], templates, hp))
            t_values += time.perf_counter() - t
            print(f"values {hi}/{max(ns)} ({time.perf_counter() - t:.1f} s)", flush=True)
        vals = concat(parts)
        for l, w in base.items():
            lm.adapter.set_weight(l, w)
        t = time.perf_counter()
        editor = Editor(lm, method="memit", mode="one_time", hparams=edit_hp)
        step = editor.apply(facts[:n], values=ValueResult(vals.z[:, :n], vals.h0[:, :n], vals.steps[:n],
                                                          vals.loss[:n], vals.nll[:n]))
        solve_s = time.perf_counter() - t
        row = measure(lm, facts[:n], refs, base, edit_hp.layers, args.gen_limit)
        row.update({"n": n, "seconds_solve": solve_s, "seconds_values_this_run": t_values,
                    "mean_value_steps": sum(vals.steps[:n]) / n,
                    "residual_norms": {str(k): float(v) for k, v in (step.residual_norms or {}).items()}})
        where[str(n)] = row
        atomic_write_json(res_path, results)
        e, d = row["edit"], row["drift"] or {}
        print(f"N={n}: eff {e['efficacy']:.3f} gen {e['generalization']:.3f} spe {e['specificity']:.3f} "
              f"ppl {d.get('ppl')} top1 {d.get('agreement')} gen-eff {row['generation']['generation_efficacy']}",
              flush=True)
        for l, w in base.items():
            lm.adapter.set_weight(l, w)
        del editor


if __name__ == "__main__":
    main()
