"""Plot a key-drift report (``seqedit constraint-fit --key-drift --json``): per edited layer, how far the
facts' keys moved from the stored ones, and the unmet share with the keys read now against the stored
keys, by the step that wrote the facts (oldest left).

    seqedit constraint-fit -l LEDGER --key-drift --groups 11 --json > drift.json
    python benchmarks/key_drift_plot.py drift.json drift.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seqedit.report import save_png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="the JSON of --key-drift (a one-report list or the report itself)")
    ap.add_argument("png", type=Path)
    args = ap.parse_args()
    data = json.loads(args.report.read_text("utf-8"))
    rep = data[0] if isinstance(data, list) else data
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9.0, 3.2))
    cmap = plt.get_cmap("viridis")
    layers = list(rep["layers"].items())
    for i, (layer, e) in enumerate(layers):
        xs = [g["steps"][0] for g in e["by_step"]]
        color = cmap(i / max(1, len(layers) - 1))
        a.plot(xs, [g["median"] for g in e["by_step"]], marker="o", ms=3, color=color, label=f"layer {layer}")
        b.plot(xs, [g["unmet_now"] for g in e["by_step"]], marker="o", ms=3, color=color, label=f"layer {layer}")
        b.plot(xs, [g["unmet_stored"] for g in e["by_step"]], ls=":", color=color)
    a.set_title("median ‖k_now − k‖ / ‖k‖", fontsize=9)
    b.set_title("median unmet share: keys read now (solid), stored (dotted)", fontsize=9)
    for ax in (a, b):
        ax.set_xlabel(f"step that wrote the facts (of {rep['steps']}; {rep['n_facts']:,} facts)", fontsize=8)
        ax.tick_params(labelsize=7)
    a.legend(fontsize=6, frameon=False)
    save_png(fig, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
