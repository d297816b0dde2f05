"""Choose the embedded model's edited layers (and λ) on CounterFact records of the `train` split.

For each candidate set of 5 consecutive layers and each λ, edit N facts in one step into a fresh copy
of the model and score efficacy (edit prompt), generalization (the paraphrase) and specificity (the
neighbourhood prompt keeps its true answer) by CounterFact's length-normalised NLL comparison. Target
values depend only on the z-layer, so they are optimised once per z-layer and reused across λ.

    python benchmarks/layer_sweep.py --n 50 --out docs/experiments/layer-sweep.md
"""

from __future__ import annotations

import argparse
import json
import random
import time


import seqedit
from seqedit.evaluate.counterfact import counterfact_metrics
from seqedit.shared_data import counterfact_path, wikitext_path
from seqedit.locate.stats import layer_stats
from seqedit.locate.values import compute_values


def metrics(lm, facts) -> dict[str, float]:
    r = counterfact_metrics(lm, facts)
    return {"efficacy": r.efficacy, "generalization": r.generalization, "specificity": r.specificity}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--starts", default="2,4,6,8")
    ap.add_argument("--lams", default="5000,15000,50000")
    ap.add_argument("--v-steps", default="", help="comma-separated value-step budgets to compare")
    ap.add_argument("--out", default="docs/experiments/layer-sweep.md")
    args = ap.parse_args()

    lm = seqedit.load_model("smollm2-135m")
    pool = seqedit.load_facts(counterfact_path(), split="train")
    facts = random.Random(args.seed).sample(pool, args.n)
    base = seqedit.preset_for(lm.name, lm.adapter.n_layers)
    starts = [int(x) for x in args.starts.split(",")]
    lams = [float(x) for x in args.lams.split(",")]
    all_layers = sorted({l for s in starts for l in range(s, s + 5)})
    t = time.perf_counter()
    layer_stats(lm, all_layers, wikitext_path("valid"), base.stats_tokens, base.stats_seq_len)
    print(f"Σ₀ for layers {all_layers}: {time.perf_counter() - t:.0f} s", flush=True)
    w0 = {l: lm.adapter.weight(l).clone() for l in all_layers}
    before = metrics(lm, facts)
    print("before", before, flush=True)
    rows = []
    budgets = [int(x) for x in args.v_steps.split(",")] if args.v_steps else [base.v_steps]
    for s, v_steps in [(s, b) for s in starts for b in budgets]:
        layers = tuple(range(s, s + 5))
        hp = base.override(layers=layers, v_steps=v_steps)
        editor0 = seqedit.Editor(lm, hparams=hp)
        t = time.perf_counter()
        values = compute_values(lm, facts, editor0.templates(), hp)
        v_s = time.perf_counter() - t
        for lam in lams:
            editor = seqedit.Editor(lm, hparams=hp.override(lam=lam))
            report = editor.apply(facts, values=values)
            m = metrics(lm, facts)
            row = {"layers": list(layers), "lam": lam, "v_steps": v_steps, **m, "residual_left": report.final_residual / report.target_norm,
                   "mean_value_steps": sum(values.steps) / len(values.steps), "values_s": v_s}
            rows.append(row)
            print(json.dumps(row), flush=True)
            for l in layers:
                lm.adapter.set_weight(l, w0[l])
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write("# Layer sweep for the embedded model (SmolLM2-135M-Instruct)\n\n")
        fh.write(f"Command: `python benchmarks/layer_sweep.py --n {args.n} --seed {args.seed} --starts {args.starts} "
                 f"--lams {args.lams} --v-steps {args.v_steps or base.v_steps}`\n\n")
        fh.write(f"{args.n} CounterFact facts from the `train` split (seeded sample, seed {args.seed}), edited in one "
                 "step into a fresh model per row; metrics by CounterFact's length-normalised NLL comparison "
                 "(efficacy: new > true on the edit prompt; generalization: on the paraphrase; specificity: "
                 "the neighbourhood prompt keeps its true answer). `residual left` is ‖Z − H‖ after the edit over "
                 "before it, at the z-layer.\n\n")
        fh.write(f"Before editing: efficacy {before['efficacy']:.2f}, generalization {before['generalization']:.2f}, "
                 f"specificity {before['specificity']:.2f}.\n\n")
        fh.write("| layers | λ | step budget | efficacy | generalization | specificity | residual left "
                 "| value steps/fact | values s |\n")
        fh.write("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            fh.write(f"| {r['layers'][0]}–{r['layers'][-1]} | {r['lam']:.0f} | {r['v_steps']} | {r['efficacy']:.2f} | "
                     f"{r['generalization']:.2f} | {r['specificity']:.2f} | {r['residual_left']:.2f} | "
                     f"{r['mean_value_steps']:.1f} | {r['values_s']:.0f} |\n")


if __name__ == "__main__":
    main()
