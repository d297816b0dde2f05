"""Where the drift is: the edit's output change on general text, per layer, read from ledger snapshots.

‖W_ℓ − W₀,ℓ‖_F counts every direction alike; the objective's preservation term weighs them by Σ₀, the
key covariance on WikiText (λ‖ΔW‖²_{Σ₀} = λ·tr(ΔW Σ₀ ΔWᵀ)). What moves the model on ordinary text is the
second: ``tr(ΔW Σ₀ ΔWᵀ)`` is the mean squared change of layer ℓ's FFN output over the keys Σ₀ was
estimated on. This script reports it relative to the layer's own output on those keys,

    r_ℓ = ‖ΔW Σ₀^{1/2}‖_F / ‖W₀ Σ₀^{1/2}‖_F,     with ‖X Σ₀^{1/2}‖²_F = tr(X Σ₀ Xᵀ),

next to ‖ΔW‖_F, for every snapshot a ledger keeps (the aligned forms snapshot every ``snapshot_every``
steps; naive forms keep their last two), so configurations of a sweep can be compared with their
perplexity increase. Reads the ledger's files only (read-only; W₀ from the base model):

    python benchmarks/preservation_cost.py docs/results/sweep-2000 /work/runs/sweep-2000/ledgers/* \\
        --out docs/results/sweep-2000/preservation.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import seqedit
from seqedit.atomic import atomic_write_json
from seqedit.ledger import Ledger


def relative_cost(delta: torch.Tensor, W0: torch.Tensor, sigma0: torch.Tensor) -> float:
    """``r = sqrt(tr(Δ Σ₀ Δᵀ) / tr(W₀ Σ₀ W₀ᵀ))`` (``Δ, W₀: [d_out, d_in]``, ``Σ₀: [d_in, d_in]``, float64)."""
    num = float(((delta @ sigma0) * delta).sum())
    den = float(((W0 @ sigma0) * W0).sum())
    return (max(num, 0.0) / den) ** 0.5


def ledger_costs(path: Path, w0: dict[int, torch.Tensor]) -> dict:
    """Per snapshot step of the ledger at ``path``: per layer ‖ΔW‖_F and r_ℓ, and the facts in force then."""
    with Ledger(path) as L:
        layers = [int(x) for x in L.manifest["hparams"]["layers"]]
        sigma0 = L.sigma0(layers)
        out = {"ledger": str(path), "method": L.manifest.get("method_label"), "snapshots": []}
        for step in L.snapshot_steps():
            snap = L.snapshot(step, layers)
            row = {"step": step, "facts_in_force": len(L.in_force_after(step)), "layers": {}}
            for l in layers:
                d = snap[l]["master"].double() - w0[l]
                row["layers"][str(l)] = {"delta_fro": float(d.norm()),
                                         "relative_cost": relative_cost(d, w0[l], sigma0[l].double())}
            out["snapshots"].append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ledgers", nargs="+", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    lm = seqedit.load_model(args.model)
    n = lm.adapter.n_layers
    w0 = {l: lm.adapter.weight(l).detach().double().cpu() for l in range(n)}
    report = {"model": lm.name, "ledgers": {p.name: ledger_costs(p, w0) for p in args.ledgers if Ledger.exists(p)}}
    atomic_write_json(args.out, report)
    for name, r in report["ledgers"].items():
        for s in r["snapshots"]:
            cells = " ".join(f"L{l}:{v['relative_cost']:.3f}" for l, v in s["layers"].items())
            print(f"{name:24s} facts {s['facts_in_force']:5d}  r: {cells}")
    return report


if __name__ == "__main__":
    main()
