"""float32 vs bfloat16 (upper blocks from weight copies, locate/low_precision.py) value optimisation on the embedded model: time and edit quality.

Both precisions optimise the target values of the same CounterFact `train` facts on the unedited
model, alternating chunk by chunk in one process (so that other load on the machine hits both
alike); then each set of values is edited in one step into the base model and scored (efficacy,
generalization, specificity), and the two δ sets are compared directly.

    python benchmarks/value_precision.py --n 100 --out docs/results/value-precision.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import seqedit
from seqedit.atomic import atomic_write_json
from seqedit.evaluate.counterfact import counterfact_metrics
from seqedit.evaluate.selection import select_facts
from seqedit.locate.values import ValueResult, compute_values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    lm = seqedit.load_model("smollm2-135m")
    facts = select_facts("counterfact", args.n, args.seed, split="train").facts
    preset = seqedit.preset_for(lm.name, lm.adapter.n_layers)
    dtypes = ("float32", "bfloat16")
    editor = seqedit.Editor(lm)
    templates = editor.templates()
    parts: dict[str, list] = {d: [] for d in dtypes}
    seconds = dict.fromkeys(dtypes, 0.0)
    for lo in range(0, len(facts), args.chunk):
        for d in dtypes:
            t = time.perf_counter()
            parts[d].append(compute_values(lm, facts[lo:lo + args.chunk], templates, preset.override(v_compute_dtype=d)))
            seconds[d] += time.perf_counter() - t
            print(f"{d} facts {lo}-{lo + args.chunk}: {seconds[d]:.1f} s so far", flush=True)

    base = {l: lm.adapter.weight(l).detach().clone() for l in preset.layers}
    before = counterfact_metrics(lm, facts).summary()
    result = {"n": len(facts), "model": lm.name, "threads": torch.get_num_threads(), "before": before, "by_dtype": {}}
    deltas = {}
    for d in dtypes:
        z = torch.cat([p.z for p in parts[d]], 1)
        h0 = torch.cat([p.h0 for p in parts[d]], 1)
        deltas[d] = z - h0
        steps = [s for p in parts[d] for s in p.steps]
        values = ValueResult(z=z, h0=h0, steps=steps,
                             loss=[x for p in parts[d] for x in p.loss],
                             nll=[x for p in parts[d] for x in p.nll])
        ed = seqedit.Editor(lm, hparams=preset.override(v_compute_dtype=d))
        ed.apply(facts, values=values)
        m = counterfact_metrics(lm, facts).summary()
        for layer, w in base.items():
            lm.adapter.set_weight(layer, w)
        result["by_dtype"][d] = {"values_seconds": seconds[d], "mean_value_steps": sum(steps) / len(steps),
                                 "mean_final_nll": sum(values.nll) / len(values.nll),
                                 **{k: m[k] for k in ("efficacy", "generalization", "specificity")}}
        print(d, json.dumps(result["by_dtype"][d]), flush=True)
    diff = (deltas["bfloat16"] - deltas["float32"]).norm(dim=0) / deltas["float32"].norm(dim=0)
    cos = torch.nn.functional.cosine_similarity(deltas["bfloat16"], deltas["float32"], dim=0)
    result["delta_relative_difference"] = {"mean": float(diff.mean()), "max": float(diff.max())}
    result["delta_cosine"] = {"mean": float(cos.mean()), "min": float(cos.min())}
    result["speedup"] = seconds["float32"] / seconds["bfloat16"]
    print(json.dumps({k: result[k] for k in ("delta_relative_difference", "delta_cosine", "speedup")}), flush=True)
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
