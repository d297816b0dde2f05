"""The PNG plots of an evaluation run (matplotlib, Agg backend), drawn from ``results.json`` alone; see
:mod:`seqedit.report` for what each shows. Colour = method, line style = alignment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .evaluate.schema import ConfigEntry, CurvePoint, EditMetrics, FinalMetrics, ResultsFile, RetentionPoint, Settings
from .report_data import (EDIT_METRICS, SHORT_NAMES, Getter, StepPoint, as_results, cohort_points, config_rows,
                          edit_metric, generation_efficacy, of_drift, of_f1, step_points)

__all__ = ["PLOTS", "method_styles", "render_plots", "save_png"]


def method_styles(rows) -> dict[tuple[str, str], dict]:
    """Matplotlib style per ``(method, alignment)`` of ``rows`` (an iterable of such pairs): colour = method
    (in order of appearance), line style = alignment (solid: aligned)."""
    rows = list(rows)
    colors = "C0 C1 C2 C3 C4 C5 C6 C7 C8 C9".split()
    methods = list(dict.fromkeys(m for m, _ in rows))
    return {(m, a): {"color": colors[methods.index(m) % 10], "linestyle": "-" if a == "aligned" else "--"}
            for m, a in rows}


# A curve point: a retention point (edit metrics), a general/drift point or a step's weight drift, with its
# number of edits.
Point = RetentionPoint | CurvePoint | StepPoint
# (title, "retention", "curve" or "steps", the value: of edit metrics for retention, of a CurvePoint or
# FinalMetrics for curve, of a StepPoint for steps)
Panel = tuple[str, str, Getter]


def _series(points: Sequence[Point], get: Getter) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for p in points:
        y = get(p)
        if y is not None:
            xs.append(p.edits)
            ys.append(y)
    return xs, ys


def save_png(fig, path: Path, tight: bool = True) -> Path:
    """Write matplotlib ``fig`` to ``path`` atomically (72 dpi) and close it."""
    if tight:
        fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _points(entry: ConfigEntry, source: str, n: int, batch_size: int | None = None) -> Sequence[Point]:
    """Curve points of one configuration: ``retention`` (edit metrics, else the final one), ``curve`` or
    ``steps`` (the weight drift every step recorded)."""
    if source == "steps":
        return step_points(entry, batch_size)
    final = entry.final
    if final is None:  # still running: the points so far
        return entry.retention if source == "retention" else entry.curve
    if source == "retention":
        return entry.retention or [RetentionPoint.of(final.edit or EditMetrics(), edits=n)]
    return entry.curve or [CurvePoint(edits=n, general=final.general, drift=final.drift)]


def _measured(m: FinalMetrics | None, source: str, get: Getter) -> float | None:
    """A panel's value of a final model or the baseline (its edit metrics for a ``retention`` panel;
    nothing for a ``steps`` panel, whose pre-edit value is 0)."""
    if m is None or source == "steps":
        return None
    if source == "retention":
        return None if m.edit is None else get(m.edit)
    return get(m)


def _curve_panels(data: ResultsFile, panels: list[Panel], path: Path, scales: dict[str, float]) -> Path:
    """One panel per ``(title, source, value)``; ``source`` is ``retention`` (a value of edit metrics) or
    ``curve`` (a value of a general/drift point)."""
    import matplotlib.pyplot as plt

    st = data.settings or Settings()
    rows, n = config_rows(data, running=True), st.n or 0
    style = method_styles(rows)
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.4 * nrows + (0 if cols * nrows > len(panels) else 0.8)),
                             squeeze=False)
    for ax, (title, source, get) in zip(axes.flat, panels):
        scale = scales.get(title, 100.0)
        b = 0.0 if source == "steps" else _measured(data.baseline, source, get)
        for (m, a), e in rows.items():
            if e.get("se"):
                xs, ys = _series(_points(e["se"], source, n, st.batch_size), get)
                if b is not None:
                    xs, ys = [0, *xs], [b, *ys]
                ax.plot(xs, [y * scale for y in ys], marker="o", ms=3, label=f"{m}/{a} SE", **style[(m, a)])
            if (ote := e.get("ote")) is not None and (y := _measured(ote.final, source, get)) is not None:
                ax.plot([n], [y * scale], marker="x", ms=8, ls="none", color=style[(m, a)]["color"],
                        label=f"{m}/{a} OTE")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("edits", fontsize=8)
        ax.tick_params(labelsize=7)
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare and handles:  # the legend fills the unused panels
        spare[0].legend(handles, labels, fontsize=7, loc="upper left", frameon=False, ncol=1 + len(spare) // 2)
        fig.tight_layout()
    elif handles:
        rows_of_legend = -(-len(labels) // 4)
        fig.tight_layout(rect=(0, 0.05 + 0.05 * rows_of_legend, 1, 1))
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4, frameon=False)
    return save_png(fig, path, tight=False)


def _se_vs_ote(data: ResultsFile, metrics: tuple[str, ...], path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    rows = config_rows(data)
    labels = [f"{m}/{a}" for m, a in rows]
    # only the modes that ran get bars, and a metric not measured gets none (a 0 bar would read as a score)
    modes = [(mode, color) for mode, color in (("se", "C0"), ("ote", "C1"))
             if any(e[mode].final is not None for e in rows.values() if mode in e)]
    width = 0.76 / max(1, len(modes))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8), squeeze=False)
    x = np.arange(len(rows))
    for ax, metric in zip(axes.flat, metrics):
        for k, (mode, color) in enumerate(modes):
            edits = [e[mode].final.edit if mode in e and e[mode].final is not None else None for e in rows.values()]
            ys = [np.nan if (y := edit_metric(edit, metric)) is None else y * 100 for edit in edits]
            ax.bar(x + (k - (len(modes) - 1) / 2) * width, ys, width, label=mode.upper(), color=color)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(SHORT_NAMES.get(metric, metric) + " ×100", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, 100)
    axes.flat[0].legend(fontsize=7)
    return save_png(fig, path)


def _cohort_curves(data: ResultsFile, metrics: tuple[str, ...], path: Path) -> Path | None:
    """Per SE configuration with cohort data, one panel per metric: one line per cohort (the facts edited
    between two retention points, early ones dark) against the number of edits."""
    import matplotlib.pyplot as plt

    rows = [((m, a), cohort_points(e["se"])) for (m, a), e in config_rows(data, running=True).items() if "se" in e]
    rows = [(key, pts) for key, pts in rows if len(pts) >= 2]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), len(metrics), figsize=(3.2 * len(metrics), 2.6 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for r, ((m, a), points) in enumerate(rows):
        cohorts = [c.facts for c in points[-1].by_cohort or ()]
        for ax, metric in zip(axes[r], metrics):
            for i, key in enumerate(cohorts):
                xs, ys = [], []
                for p in points:
                    c = next((c for c in p.by_cohort or () if c.facts == key), None)
                    if c is not None and c.metric(metric) is not None:
                        xs.append(p.edits)
                        ys.append(100 * c.metric(metric))
                ax.plot(xs, ys, marker="o", ms=3, color=cmap(i / max(1, len(cohorts) - 1)),
                        label=f"facts {key[0]:,}–{key[1]:,}")
            ax.set_title(f"{m}/{a}: {SHORT_NAMES.get(metric, metric)} by cohort", fontsize=9)
            ax.set_xlabel("edits", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[r][0].legend(fontsize=6, frameon=False)
    return save_png(fig, path)


def _edit_value(name: str) -> Getter:
    return lambda e: edit_metric(e, name)


def render_plots(data: ResultsFile | Mapping[str, Any], folder: str | Path) -> list[Path]:
    """Write the PNG plots of ``data`` (typed, or a results.json dict) into ``folder``; returns their
    paths (none if nothing is done)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    data = as_results(data)
    folder = Path(folder)
    if not config_rows(data, running=True):
        return []
    st = data.settings or Settings()
    metrics = EDIT_METRICS.get("counterfact" if st.dataset is None else st.dataset, ())
    edit_panels: list[Panel] = [(SHORT_NAMES[m], "retention", _edit_value(m)) for m in metrics]
    if any(generation_efficacy(p) is not None for e in _se_entries(data) for p in e.retention):
        edit_panels.append(("G-eff", "retention", generation_efficacy))
    out = [_curve_panels(data, edit_panels, folder / "edit_metrics_vs_edits.png", {})]
    if config_rows(data):  # final models to compare
        out.append(_se_vs_ote(data, metrics, folder / "se_vs_ote.png"))
    panels: list[Panel] = []
    if st.general_n:
        panels.append(("mean F1", "curve", of_f1()))
        panels += [(f"{t} F1", "curve", of_f1(t)) for t in st.general_tasks or ()]
    if st.drift_windows:
        panels += [("PPL", "curve", of_drift("ppl")), ("top-1 agree", "curve", of_drift("agreement"))]
    if panels:
        out.append(_curve_panels(data, panels, folder / "general_vs_edits.png", {"PPL": 1.0}))
    if (cohorts := _cohort_curves(data, metrics, folder / "retention_by_cohort.png")) is not None:
        out.append(cohorts)
    layers = sorted({k for e in _se_entries(data) for p in step_points(e, st.batch_size) for k in p.drift}, key=int)
    if layers:
        out.append(_curve_panels(data, [(f"‖W − W₀‖ layer {l}", "steps", _drift_of(l)) for l in layers],
                                 folder / "weight_drift_vs_edits.png", {f"‖W − W₀‖ layer {l}": 1.0 for l in layers}))
    return out


def _se_entries(data: ResultsFile) -> list[ConfigEntry]:
    return [e["se"] for e in config_rows(data, running=True).values() if e.get("se")]


def _drift_of(layer: str) -> Getter:
    return lambda p: p.drift.get(layer)


PLOTS = ("edit_metrics_vs_edits.png", "se_vs_ote.png", "general_vs_edits.png", "retention_by_cohort.png",
         "weight_drift_vs_edits.png")
