"""Batched vs one-fact-at-a-time value optimisation on the embedded model (same facts, same result).

    python benchmarks/batched_values.py --n 100 --alone 25
"""

from __future__ import annotations

import argparse
import time

import torch

import seqedit
from seqedit.shared_data import counterfact_path
from seqedit.locate.templates import context_templates
from seqedit.locate.values import compute_values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="facts optimised together")
    ap.add_argument("--alone", type=int, default=25, help="of those, how many to also optimise one by one")
    args = ap.parse_args()
    lm = seqedit.load_model("smollm2-135m")
    hp = seqedit.preset_for(lm.name, lm.adapter.n_layers).override(v_batch_facts=args.n)
    facts = seqedit.load_facts(counterfact_path(), split="train", limit=args.n)
    templates = context_templates(lm, hp.n_context_templates, hp.context_template_len, hp.template_seed)
    t = time.perf_counter()
    together = compute_values(lm, facts, templates, hp)
    batched_s = time.perf_counter() - t
    t = time.perf_counter()
    alone = [compute_values(lm, [f], templates, hp) for f in facts[: args.alone]]
    alone_s = time.perf_counter() - t
    z_alone = torch.cat([a.z for a in alone], 1)
    rel = ((together.z[:, : args.alone] - z_alone).norm(dim=0) / z_alone.norm(dim=0)).max().item()
    same_steps = sum(a.steps[0] == s for a, s in zip(alone, together.steps))
    per_fact = alone_s / args.alone
    print(f"batched: {args.n} facts in {batched_s:.1f} s ({batched_s / args.n:.2f} s/fact)")
    print(f"one at a time: {args.alone} facts in {alone_s:.1f} s ({per_fact:.2f} s/fact)")
    print(f"speed-up for {args.n} facts: {per_fact * args.n / batched_s:.1f}x "
          f"(one-at-a-time time extrapolated from {args.alone} facts)")
    print(f"max relative difference of z (batched vs alone): {rel:.2e}; same step count: {same_steps}/{args.alone}")


if __name__ == "__main__":
    main()
