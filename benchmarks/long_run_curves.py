"""Efficacy, generalization, perplexity increase and top-1 agreement against edits for several long runs
on one plot, one colour each (issue 30's 10,000-edit confirmations side by side), with generation
efficacy and the z-layer's ‖W − W₀‖_F where the files hold them, and a panel with the trade-off itself: perplexity increase against efficacy, each point labelled with its thousands of
edits, the 10,000-edit targets (efficacy ≥ 90, perplexity ≤ +30 %) shaded.

Each ``--run LABEL=PATH`` is a ``seqedit eval`` folder's ``results.json`` (its SE configuration's retention
points, perplexity from its curve against the folder's baseline) or a ``benchmarks/long_sweep.py``
configuration file (``NAME.json`` or ``NAME.partial.json``: its points; ``--baseline`` the sweep's
``baseline.json`` for the pre-edit perplexity).

    python benchmarks/long_run_curves.py --run s30-mp=docs/results/cf-10000-mp/results.json \\
        --run lamN-refresh=docs/results/cf-10000-lamN-refresh/s30-mp-lamN-refresh.partial.json \\
        --baseline docs/results/cf-10000-lamN-refresh/baseline.json --out docs/results/cf-10000-lamN-refresh/curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Point = dict[str, float]


def eval_points(data: dict) -> list[Point]:
    """``[{edits, efficacy, generalization, ppl_increase, top1}]`` of a ``seqedit eval`` results file's
    single SE configuration, at its retention points that have a perplexity measurement."""
    (entry,) = [e for key, e in data["configs"].items() if key.endswith("/se")]
    base = data["baseline"]["drift"]["ppl"]
    curve = {c["edits"]: c for c in entry["curve"] if c.get("drift")}
    steps = {s["id"]: s for s in entry["steps"]}
    return [{"edits": r["edits"], "efficacy": r["efficacy"], "generalization": r["generalization"],
             "ppl_increase": curve[r["edits"]]["drift"]["ppl"] / base - 1,
             "top1": curve[r["edits"]]["drift"]["agreement"],
             "generation_efficacy": (r.get("generation") or {}).get("generation_efficacy"),
             "delta_w_top": _top(steps[r["step"]]["drift_norms"]) if r.get("step") in steps else None}
            for r in entry["retention"] if r["edits"] in curve]


def _top(norms: dict[str, float] | None) -> float | None:
    """‖W − W₀‖_F of the highest edited layer (the z-layer, which carries most of the edit)."""
    return norms[max(norms, key=int)] if norms else None


def sweep_points(data: dict, base_ppl: float) -> list[Point]:
    """The same from a ``long_sweep.py`` configuration file."""
    return [{"edits": p["edits"], "efficacy": p["efficacy"], "generalization": p["generalization"],
             "ppl_increase": p["ppl"] / base_ppl - 1, "top1": p["top1_agreement"],
             "generation_efficacy": p.get("generation_efficacy"), "delta_w_top": _top(p.get("delta_w_fro"))}
            for p in data["points"]]


def load(path: Path, base_ppl: float | None) -> list[Point]:
    data = json.loads(path.read_text())
    if "configs" in data:
        return eval_points(data)
    if base_ppl is None:
        raise SystemExit(f"{path} is a long_sweep file: pass --baseline (the sweep's baseline.json)")
    return sweep_points(data, base_ppl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="LABEL=PATH, repeated")
    ap.add_argument("--baseline", type=Path, default=None, help="a long_sweep baseline.json (pre-edit perplexity)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    base = json.loads(args.baseline.read_text())["ppl"] if args.baseline else None
    runs = {}
    for spec in args.run:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--run {spec!r}: expected LABEL=PATH")
        runs[label] = load(Path(path), base)
    panels = (("efficacy", "efficacy (all facts so far)", 100), ("generalization", "generalization", 100),
              ("generation_efficacy", "generation efficacy (greedy output begins with the target)", 100),
              ("ppl_increase", "WikiText-2 perplexity increase (%)", 100), ("top1", "top-1 agreement", 1),
              ("delta_w_top", "‖W − W₀‖_F of the z-layer", 1))
    fig, grid = plt.subplots(2, 4, figsize=(20, 7.6))
    axes = grid.ravel()
    for ax, (key, title, scale) in zip(axes, panels):
        for i, (label, pts) in enumerate(runs.items()):
            have = [p for p in pts if p.get(key) is not None]
            ax.plot([p["edits"] for p in have], [scale * p[key] for p in have], "o-", color=f"C{i}", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    axes[7].axis("off")
    ax = axes[6]
    ax.fill_between([90, 100], [0, 0], [30, 30], color="0.85", label="10,000-edit targets")
    for i, pts in enumerate(runs.values()):
        xs, ys = [100 * p["efficacy"] for p in pts], [100 * p["ppl_increase"] for p in pts]
        ax.plot(xs, ys, "o-", color=f"C{i}", ms=4)
        for p, x, y in zip(pts, xs, ys):
            if p["edits"] % 2000 == 0 or p is pts[-1]:
                ax.annotate(f"{p['edits'] / 1000:g}k", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
                            color=f"C{i}")
    ax.set_title("perplexity increase (%) against efficacy")
    ax.set_xlabel("efficacy (all facts so far)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    axes[0].legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
