"""The value pass through the model's modules against the fused upper blocks (issue 34): time, value
steps and δ agreement on the same facts, in one process, one mode after the other.

    python benchmarks/upper_blocks_agreement.py --n 100 --modes modules,fused,compiled \\
        --out docs/results/value-profile/upper-blocks-agreement.json

Each mode first runs two facts (allocator, oneDNN kernels, a compile where asked), then all ``--n``
CounterFact ``train`` facts (``seqedit bench``'s). The first mode is the reference: h0's largest
difference, the cosine of every fact's δ and how many facts took the same number of value steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import seqedit
from seqedit.atomic import atomic_write_json
from seqedit.datasets import load_facts
from seqedit.locate.values import compute_values
from seqedit.shared_data import counterfact_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--modes", default="modules,fused")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    modes = args.modes.split(",")
    lm = seqedit.load_model("smollm2-135m")
    hp0 = seqedit.preset_for(lm.name, lm.adapter.n_layers)
    facts = load_facts(str(counterfact_path()), split="train", limit=args.n, distinct=True)
    templates = seqedit.Editor(lm, hparams=hp0).templates()
    runs, values = {}, {}
    for mode in modes:
        hp = hp0.override(v_upper_blocks=mode)
        compute_values(lm, facts[:2], templates, hp)
        t = time.perf_counter()
        values[mode] = v = compute_values(lm, facts, templates, hp)
        runs[mode] = {"seconds": time.perf_counter() - t, "mean_value_steps": sum(v.steps) / len(facts)}
        ref = values[modes[0]]
        cos = torch.nn.functional.cosine_similarity(ref.z - ref.h0, v.z - v.h0, dim=0)
        runs[mode].update({"h0_max_abs_diff": float((ref.h0 - v.h0).abs().max()), "delta_cos_mean": float(cos.mean()),
                           "delta_cos_min": float(cos.min()),
                           "same_value_steps": sum(a == b for a, b in zip(ref.steps, v.steps))})
        print(mode, {k: round(x, 4) for k, x in runs[mode].items()}, flush=True)
    if args.out:
        atomic_write_json(args.out, {"model": lm.name, "n": len(facts), "threads": torch.get_num_threads(),
                                     "reference": modes[0], "runs": runs})


if __name__ == "__main__":
    main()
