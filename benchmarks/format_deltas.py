"""Do the two prompt formats of `both` ask the same of a fact's key and of its δ?

For the first N facts of a dataset, on the model as loaded (unedited), this reads

- per edited layer, the cosine between each fact's bare key column and its chat key column (as
  ``format_columns`` writes them), against the median cosine between different facts' bare keys;
- the δ each format's own value optimisation finds (what `bare` and `chat` editing optimise, each
  within one format's budget), their cosine, and their cosine with the one δ that `both` optimises
  over the rows of the two formats together (within √2 of the budget);
- each δ's norm over ‖h₀‖ and the final mean target NLL of each optimisation.

Collinear keys with unlike δ's would make one δ per format a poor design: the two columns of a fact
would ask different values of almost the same key. `docs/chat.md` records what this measured.

    python benchmarks/format_deltas.py --dataset zsre --n 100 --json out.json

≈ 25 min for 100 ZsRE facts with one thread (three value optimisations).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from seqedit.locate.chat import formats
from seqedit.locate.keys import ContextRows, read_keys
from seqedit.locate.templates import context_templates
from seqedit.locate.values import compute_values


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {"p10": float(x.quantile(0.1)), "median": float(x.median()), "p90": float(x.quantile(0.9))}


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise cosine of ``a, b: [d, n]``."""
    return torch.nn.functional.cosine_similarity(a, b, dim=0)


def measure(loaded, facts, hp) -> dict:
    """The comparison above for ``facts`` on ``loaded`` with hyperparameters ``hp`` (its layers, templates
    and value settings; ``format_columns`` is implied)."""
    templates = context_templates(loaded, hp.n_context_templates, hp.context_template_len, hp.template_seed)
    ctx = ContextRows.build(loaded.tokenizer, facts, templates, "both", True)
    keys = read_keys(loaded, ctx, hp.layers, batch_rows=hp.key_batch_rows).keys
    layers = {}
    for layer in hp.layers:
        K = keys[layer].double()
        bare, chat = K[:, 0::2], K[:, 1::2]
        unit = bare / bare.norm(dim=0)
        gram = unit.T @ unit
        others = gram[~torch.eye(gram.shape[0], dtype=torch.bool)]
        layers[str(layer)] = {"same_fact_bare_chat": _quantiles(_cos(bare, chat)),
                              "other_facts_bare_median": float(others.median()) if others.numel() else None}
    runs = {fmt: compute_values(loaded, facts, templates, hp, prompt_format=fmt) for fmt in (*formats("both"), "both")}
    delta = {fmt: r.z - r.h0 for fmt, r in runs.items()}
    return {
        "facts": len(facts),
        "keys_by_layer": layers,
        "delta_cos_bare_chat": _quantiles(_cos(delta["bare"], delta["chat"])),
        "delta_cos_both_bare": _quantiles(_cos(delta["both"], delta["bare"])),
        "delta_cos_both_chat": _quantiles(_cos(delta["both"], delta["chat"])),
        "delta_over_h0": {fmt: _quantiles(d.norm(dim=0) / runs[fmt].h0.norm(dim=0)) for fmt, d in delta.items()},
        "final_nll": {fmt: _quantiles(torch.tensor(r.nll)) for fmt, r in runs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from seqedit.evaluate.selection import select_facts
    from seqedit.models.load import load_model
    from seqedit.models.presets import preset_for

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="zsre", choices=["zsre", "counterfact"])
    ap.add_argument("--split", default=None, help="CounterFact split (train | edit)")
    ap.add_argument("--n", type=int, default=100, help="the first N facts of the evaluation's seeded selection")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    selection = select_facts(args.dataset, args.n, 0, split=args.split, unique_slots=True)
    loaded = load_model(args.model)
    hp = preset_for(loaded.name, loaded.adapter.n_layers).for_formats(2)
    out = {"model": loaded.name, "dataset": args.dataset, "split": args.split, **measure(loaded, selection.facts, hp)}
    text = json.dumps(out, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
