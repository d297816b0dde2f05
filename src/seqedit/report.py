"""Tables and plots of an evaluation run, rendered from ``results.json`` alone.

``render(folder)`` writes ``report.md`` (the paper's layout: one row per method/alignment, one column
per metric, each cell ``SE | OTE``) and small PNG plots (matplotlib, Agg backend):

* ``edit_metrics_vs_edits.png`` — efficacy / generalization / specificity against the number of edits
  (SE retention curve where recorded, else the final point; OTE as a cross at n; pre-edit at 0);
* ``se_vs_ote.png`` — final metrics, SE and OTE side by side per method/alignment;
* ``general_vs_edits.png`` — general-task F1 (mean and per task), WikiText-2 perplexity and top-1
  agreement against the number of edits;
* ``retention_by_cohort.png`` — where retention points carry per-cohort means: each cohort's (the facts
  edited between two retention points) metrics against the number of edits, early cohorts dark.

Colour = method, line style = alignment (solid aligned, dashed otherwise), so aligned vs naive reads
off each panel. Rates are ×100 in the table, as in the paper.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_write, atomic_write_text

__all__ = ["EDIT_METRICS", "PLOTS", "markdown", "render", "render_data", "render_plots", "rendered"]

EDIT_METRICS = {
    "counterfact": ("efficacy", "generalization", "specificity"),
    "zsre": ("efficacy", "generalization", "specificity_vs_pre_edit", "specificity_vs_gold"),
}
_SHORT = {"efficacy": "Eff.", "generalization": "Gen.", "specificity": "Spe.", "specificity_vs_pre_edit":
          "Spe. (vs pre-edit)", "specificity_vs_gold": "Spe. (vs gold)", "fluency": "Flu.", "consistency": "Consis."}


def load_results(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {folder}")
    return json.loads(path.read_text("utf-8"))


def _rows(data: dict[str, Any], running: bool = False) -> dict[tuple[str, str], dict[str, dict]]:
    """``{(method, alignment): {"se": entry, "ote": entry}}`` of the completed configurations, and with
    ``running`` also of those still running that have points along the run (a checkpointed run saves
    them after every step)."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for label, e in data.get("configs", {}).items():
        going = running and e.get("status") == "running" and bool(e.get("retention") or e.get("curve"))
        if e.get("status") == "done" or going:
            m, a, mode = label.split("/")
            out.setdefault((m, a), {})[mode] = e
    return out


def _get(d: dict | None, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _fmt(x: Any, scale: float = 100.0, digits: int = 1) -> str:
    return "–" if x is None else f"{x * scale:.{digits}f}"


def _mark(entry: dict | None) -> str:
    """† the run itself was not made (identical to another); ‡ its final model was bit-identical to
    another configuration's, whose final-model scores it shares."""
    return "†" if _get(entry, "same_as") else "‡" if _get(entry, "final_reused_from") else ""


def _cell(e: dict[str, dict], path: tuple[str, ...], scale: float, digits: int) -> str:
    se = _fmt(_get(e.get("se"), *path), scale, digits) + _mark(e.get("se")) if "se" in e else "·"
    ote = _fmt(_get(e.get("ote"), *path), scale, digits) + _mark(e.get("ote")) if "ote" in e else "·"
    return f"{se} \\| {ote}"


def _table(data: dict, columns: list[tuple[str, tuple[str, ...], float, int]]) -> list[str]:
    head = "| Method | Alignment | " + " | ".join(c[0] for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    base = data.get("baseline", {})
    lines.append("| pre-edit | – | " + " | ".join(_fmt(_get(base, *p), s, d) for _, p, s, d in columns) + " |")
    for (m, a), e in _rows(data).items():
        lines.append(f"| {m} | {a} | " + " | ".join(_cell(e, p, s, d) for _, p, s, d in columns) + " |")
    return lines


def _source(settings: dict[str, Any]) -> str:
    """Where the records came from, e.g. ``counterfact (knowedit layout, train split)``."""
    ds = settings.get("dataset", "counterfact")
    if settings.get("facts_path"):
        where = [f"file {settings['facts_path']}"]
    elif ds == "counterfact":
        where = [f"{settings.get('layout', 'knowedit')} layout"]
        where += [f"{settings['split']} split"] if settings.get("split") else []
    else:
        where = [f"{settings.get('zsre_file', 'mend-eval')} file"]
    return f"{ds} ({', '.join(where)})"


# the values protocol in the title line: a reader must not mistake a solver-isolating run for the real one
_PROTOCOL_TITLE = {"current": "real sequential protocol (values on the current model)",
                   "original": "frozen values (on the unedited model; isolates the solver)"}


def markdown(data: dict[str, Any]) -> str:
    """The report as markdown (tables in the paper's layout plus the protocol and timings)."""
    st, proto = data.get("settings", {}), data.get("protocol", {})
    ds = st.get("dataset", "counterfact")
    lines = [
        f"# seqedit evaluation: {_source(st)}, {st.get('n')} edits, {data.get('model', {}).get('name')}, "
        f"{_PROTOCOL_TITLE.get(proto.get('values'), 'values ' + str(proto.get('values')))}"
        + (f", rekeyed every {st['rekey_every']} steps" if st.get("rekey_every") else ""),
        "",
        f"Batch size {st.get('batch_size')} per sequential step; seed {st.get('seed')} "
        f"(records: {data.get('selection', {}).get('method', 'seeded shuffle')}); "
        f"values protocol **{proto.get('values')}**: {proto.get('values_description')}.",
        f"Evaluation: {proto.get('evaluation')}. Cells are **SE \\| OTE**; rates ×100.",
        "",
        "## Editing metrics (final model)",
        "",
    ]
    cols = [(_SHORT[m], ("final", "edit", m), 100.0, 1) for m in EDIT_METRICS.get(ds, ())]
    fluency_on = ds == "counterfact" and bool(st.get("fluency_n", 1))
    if fluency_on:
        cols.append(("Flu. (×100)", ("final", "fluency", "fluency"), 100.0, 1))
    lines += _table(_unwrap_baseline(data), cols)
    if _get(data, "baseline", "edit", "chat") is not None:  # evaluate/chat.py: the facts asked as questions
        lines += ["", f"Asked through the chat template (editing prompt format **{st.get('prompt_format', 'bare')}**; "
                      "Ans. = the greedy reply's first sentence names the new target):", ""]
        lines += _table(_unwrap_baseline(data), [(f"Chat {_SHORT.get(m, 'Ans.')}", ("final", "edit", "chat", m), 100.0, 1)
                                                 for m in ("efficacy", "generalization", "specificity", "answer_new")])
    if ds == "counterfact":
        flu = _get(data, "baseline", "fluency") or {}
        missing = flu.get("n_without_prompts", 0)
        what = (f"Fluency on {flu.get('n_records', 0)} records' ROME generation prompts "
                f"({flu.get('n_texts', 0)} sampled texts"
                + (f"; {missing} selected records have none: KnowEdit-layout records get them only by case id "
                   "from the 1,115-case ROME subset)." if missing else ").")
                if fluency_on
                else "Fluency not measured (--fluency-n 0).")
        lines += ["", f"{what} {proto.get('consistency', '')}"]
    else:
        lines += ["", f"ZsRE target convention: {proto.get('zsre_target')}. {proto.get('zsre_specificity')}."]
    tasks = st.get("general_tasks", []) if st.get("general_n") else []
    drift_on = bool(st.get("drift_windows"))
    if tasks or drift_on:
        parts = [f"General capability (F1 ×100, {proto.get('general_scoring')} scoring, {st.get('general_n')} items "
                 "per task)"] if tasks else []
        parts += [f"WikiText-2 test drift ({st.get('drift_windows')} windows of {st.get('drift_window')} tokens)"] if drift_on else []
        lines += ["", "## " + " and ".join(parts), ""]
        gcols = [(t, ("final", "general", "tasks", t, "f1"), 100.0, 1) for t in tasks]
        if tasks:
            gcols.append(("mean F1", ("final", "general", "mean_f1"), 100.0, 1))
        if drift_on:
            gcols += [("PPL", ("final", "drift", "ppl"), 1.0, 2), ("top-1 agree", ("final", "drift", "agreement"), 100.0, 1)]
        lines += _table(_unwrap_baseline(data), gcols)
        if tasks:
            lines += ["", f"RTE: {proto.get('rte_labels')}."]
    lines += _along_the_run(data) + _by_cohort(data) + _sources(data)
    same = [lbl for lbl, e in data.get("configs", {}).items() if e.get("same_as")]
    if same:
        lines += ["", "† " + "; ".join(f"{lbl} is the identical one-step solve of {data['configs'][lbl]['same_as']}: "
                                      "numbers reused, not re-run" for lbl in same) + "."]
    shared = [(lbl, e["final_reused_from"]) for lbl, e in data.get("configs", {}).items()
              if e.get("final_reused_from") and not e.get("same_as")]
    if shared:
        lines += ["", "‡ " + "; ".join(f"{lbl} ended on float32 weights bit-identical to {src}'s (sha256 of the edited "
                                      "layers), so it shares that final model's scores" for lbl, src in shared) + "."]
    pending = [lbl for lbl in data.get("planned", []) if data.get("configs", {}).get(lbl, {}).get("status") != "done"]
    if pending:
        lines += ["", f"**Unfinished run**: {len(pending)} planned configurations not yet evaluated "
                      f"({', '.join(pending)}); rerun the same `seqedit eval` command to resume."]
    if data.get("skipped"):
        lines.append("")
    for s in data.get("skipped", []):
        lines.append(f"Skipped {s['config']}: {s['reason']}.")
    lines += ["", "## Timings", "", "| Config | steps | edit s | mean step s | eval s | scoring records/s |",
              "|---|---|---|---|---|---|"]
    for label, e in data.get("configs", {}).items():
        if e.get("status") != "done" or e.get("same_as"):
            continue
        s = e.get("seconds", {})
        lines.append(f"| {label} | {e.get('n_steps')} | {s.get('edit', 0):.1f} | {s.get('mean_step', 0):.1f} | "
                     f"{s.get('evaluation', 0):.1f} | {_fmt(_get(e, 'final', 'edit', 'records_per_second'), 1, 1)} |")
    v = data.get("versions", {})
    lines += ["", f"Versions: seqedit {v.get('seqedit')} ({v.get('git_commit') or 'no git'}), torch {v.get('torch')}, "
                  f"transformers {v.get('transformers')}, python {v.get('python')}, {v.get('torch_threads')} threads."]
    return "\n".join(lines) + "\n"


def _along_the_run(data: dict) -> list[str]:
    """One table per sequential configuration with intermediate points: the edit metrics of all facts
    edited so far (retention), perplexity (and its change from pre-edit), top-1 agreement and mean F1,
    one row per number of edits, the final model last. Empty when no configuration recorded any."""
    st, ds = data.get("settings", {}), data.get("settings", {}).get("dataset", "counterfact")
    metrics = EDIT_METRICS.get(ds, ())
    base_ppl = _get(data, "baseline", "drift", "ppl")
    out: list[str] = []
    for (m, a), e in _rows(data, running=True).items():
        se = e.get("se")
        if not se or not (se.get("retention") or se.get("curve")):
            continue
        points: dict[int, dict] = {}
        for p in se.get("retention") or []:
            points.setdefault(p["edits"], {})["edit"] = p
        for p in se.get("curve") or []:
            points.setdefault(p["edits"], {}).update({k: p[k] for k in ("general", "drift") if k in p})
        if "final" in se:
            points[st.get("n") or max(points)] = {**se["final"], "final": True}
        if not out:
            out += ["", "## Along the run (sequential edits; edit metrics of all facts edited so far)", ""]
        out += [f"**{m} / {a}**" + _unfinished(se, st), "",
                "| edits | " + " | ".join(_SHORT[k] for k in metrics) + " | PPL | ΔPPL | top-1 agree | mean F1 |",
                "|---:|" + "---:|" * (len(metrics) + 4)]
        base = data.get("baseline", {})
        rows = [(0, {**base, "pre": True})] + sorted(points.items())
        for edits, p in rows:
            ppl = _get(p, "drift", "ppl")
            rel = "–" if ppl is None or not base_ppl or p.get("pre") else f"{100 * (ppl / base_ppl - 1):+.1f} %"
            label = "pre-edit" if p.get("pre") else f"{edits:,}" + (" (final)" if p.get("final") else "")
            out.append(f"| {label} | " + " | ".join(_fmt(_get(p, "edit", k)) for k in metrics)
                       + f" | {_fmt(ppl, 1, 2)} | {rel} | {_fmt(_get(p, 'drift', 'agreement'))} | "
                       f"{_fmt(_get(p, 'general', 'mean_f1'))} |")
        out.append("")
    return out[:-1] if out else out


def _unfinished(se: dict, settings: dict) -> str:
    """`` (unfinished: …)`` for an entry still running, else ``""``."""
    if se.get("status") != "running":
        return ""
    return f" (unfinished: {se.get('edited', 0):,} of {settings.get('n', 0):,} facts edited so far)"


def _cohort_points(se: dict) -> list[dict]:
    """The retention points of an SE entry that carry per-cohort means, in order of edits."""
    return sorted((p for p in se.get("retention") or [] if p.get("by_cohort")), key=lambda p: p["edits"])


def _by_cohort(data: dict) -> list[str]:
    """Retention of early against late edits: one row per cohort (the facts edited between two retention
    points), one column per retention point, cells ``Eff. / Gen.`` of that cohort on that model."""
    metrics = EDIT_METRICS.get(data.get("settings", {}).get("dataset", "counterfact"), ())[:2]
    out: list[str] = []
    for (m, a), e in _rows(data, running=True).items():
        points = _cohort_points(e.get("se") or {})
        if len(points) < 2:  # one point has one cohort, which the table along the run already shows
            continue
        if not out:
            out += ["", "## Retention by cohort (" + " / ".join(_SHORT[k] for k in metrics)
                    + " of the facts edited in each stretch, re-scored at each retention point)", ""]
        base = {tuple(c["facts"]): c for c in _get(data, "baseline", "edit", "by_cohort") or []}
        heads = (["pre-edit"] if base else []) + [f"after {p['edits']:,}" for p in points]
        out += [f"**{m} / {a}**" + _unfinished(e["se"], data.get("settings", {})), "",
                "| facts | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for cohort in points[-1]["by_cohort"]:
            key = tuple(cohort["facts"])
            cells = [base.get(key)] if base else []
            cells += [next((c for c in p["by_cohort"] if tuple(c["facts"]) == key), None) for p in points]
            row = [" / ".join(_fmt(c.get(k)) for k in metrics) if c else "" for c in cells]
            out.append(f"| {key[0]:,}–{key[1]:,} | " + " | ".join(row) + " |")
        out.append("")
    return out[:-1] if out else out


def _sources(data: dict) -> list[str]:
    """The folders a comparison (:func:`seqedit.evaluate.compare.merge_results`) was merged from."""
    if not data.get("sources"):
        return []
    out = ["", "## Sources", "",
           "Merged from these results folders (one pre-edit baseline: the same model, facts and metrics; the "
           "first folder's is shown):", "",
           "| folder | configurations | values | prompt format | batch | preset | hyperparameters unlike the first folder's | commit |",
           "|---|---|---|---|---:|---|---|---|"]
    for s in data["sources"]:
        hp = "; ".join(f"{k} = {new!r} (first: {old!r})" for k, (old, new) in s.get("hparams_vs_first", {}).items())
        out.append(f"| `{s['folder']}` | {', '.join(s['configs'])} | {s.get('values')} | {s.get('prompt_format')} | "
                   f"{s.get('batch_size')} | {s.get('preset') or 'default'} | {hp or '–'} | {(s.get('commit') or 'no git')[:10]} |")
    for label, e in data.get("configs", {}).items():
        if e.get("joined_from"):
            out += ["", f"**{label}** is one run measured in parts (`--join`): its points along the run come from "
                    + " and ".join(f"`{f}`" for f in e["joined_from"]) + ", its final model from the folder that has one."]
    return out


def _unwrap_baseline(data: dict) -> dict:
    """The baseline under the same ``final`` path as the configurations, for :func:`_table`."""
    return {**data, "baseline": {"final": data.get("baseline", {})}}


# ------------------------------------------------------------------------------------------ plots


def _style(rows: dict) -> dict[tuple[str, str], dict]:
    colors = "C0 C1 C2 C3 C4 C5 C6 C7 C8 C9".split()
    methods = list(dict.fromkeys(m for m, _ in rows))
    return {(m, a): {"color": colors[methods.index(m) % 10], "linestyle": "-" if a == "aligned" else "--"}
            for m, a in rows}


def _series(points: list[dict], *path: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for p in points:
        y = _get(p, *path)
        if y is not None:
            xs.append(p["edits"])
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


def _points(entry: dict, source: str, n: int) -> list[dict]:
    """Curve points of one configuration: ``retention`` (edit metrics, else the final one) or ``curve``."""
    if "final" not in entry:  # still running: the points so far
        return entry.get(source) or []
    if source == "retention":
        return entry.get("retention") or [{"edits": n, **entry["final"]["edit"]}]
    return entry.get("curve") or [{"edits": n, **entry["final"]}]


def _curve_panels(data: dict, panels: list[tuple[str, str, tuple[str, ...]]], path: Path,
                  scales: dict[str, float]) -> Path:
    """One panel per ``(title, source, value path)``; ``source`` is ``retention`` (path inside the edit
    metrics) or ``curve`` (path inside a general/drift point)."""
    import matplotlib.pyplot as plt

    rows, n = _rows(data, running=True), data.get("settings", {}).get("n", 0)
    style = _style(rows)
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.4 * nrows + (0 if cols * nrows > len(panels) else 0.8)),
                             squeeze=False)
    for ax, (title, source, vpath) in zip(axes.flat, panels):
        scale = scales.get(title, 100.0)
        inner = ("edit", *vpath) if source == "retention" else vpath
        b = _get(data.get("baseline"), *inner)
        for (m, a), e in rows.items():
            if e.get("se"):
                xs, ys = _series(_points(e["se"], source, n), *vpath)
                if b is not None:
                    xs, ys = [0, *xs], [b, *ys]
                ax.plot(xs, [y * scale for y in ys], marker="o", ms=3, label=f"{m}/{a} SE", **style[(m, a)])
            if (y := _get(e.get("ote"), "final", *inner)) is not None:
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


def _se_vs_ote(data: dict, metrics: tuple[str, ...], path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    rows = _rows(data)
    labels = [f"{m}/{a}" for m, a in rows]
    # only the modes that ran get bars, and a metric not measured gets none (a 0 bar would read as a score)
    modes = [(mode, color) for mode, color in (("se", "C0"), ("ote", "C1"))
             if any(_get(e.get(mode), "final") for e in rows.values())]
    width = 0.76 / max(1, len(modes))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8), squeeze=False)
    x = np.arange(len(rows))
    for ax, metric in zip(axes.flat, metrics):
        for k, (mode, color) in enumerate(modes):
            ys = [np.nan if (y := _get(e.get(mode), "final", "edit", metric)) is None else y * 100
                  for e in rows.values()]
            ax.bar(x + (k - (len(modes) - 1) / 2) * width, ys, width, label=mode.upper(), color=color)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(_SHORT.get(metric, metric) + " ×100", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, 100)
    axes.flat[0].legend(fontsize=7)
    return save_png(fig, path)


def _cohort_curves(data: dict, metrics: tuple[str, ...], path: Path) -> Path | None:
    """Per SE configuration with cohort data, one panel per metric: one line per cohort (the facts edited
    between two retention points, early ones dark) against the number of edits."""
    import matplotlib.pyplot as plt

    rows = [((m, a), _cohort_points(e["se"])) for (m, a), e in _rows(data, running=True).items() if e.get("se")]
    rows = [(key, pts) for key, pts in rows if len(pts) >= 2]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), len(metrics), figsize=(3.2 * len(metrics), 2.6 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for r, ((m, a), points) in enumerate(rows):
        cohorts = [tuple(c["facts"]) for c in points[-1]["by_cohort"]]
        for ax, metric in zip(axes[r], metrics):
            for i, key in enumerate(cohorts):
                xs, ys = [], []
                for p in points:
                    c = next((c for c in p["by_cohort"] if tuple(c["facts"]) == key), None)
                    if c is not None and c.get(metric) is not None:
                        xs.append(p["edits"])
                        ys.append(100 * c[metric])
                ax.plot(xs, ys, marker="o", ms=3, color=cmap(i / max(1, len(cohorts) - 1)),
                        label=f"facts {key[0]:,}–{key[1]:,}")
            ax.set_title(f"{m}/{a}: {_SHORT.get(metric, metric)} by cohort", fontsize=9)
            ax.set_xlabel("edits", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[r][0].legend(fontsize=6, frameon=False)
    return save_png(fig, path)


def render_plots(data: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write the PNG plots of ``data`` into ``folder``; returns their paths (none if nothing is done)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    folder = Path(folder)
    if not _rows(data, running=True):
        return []
    ds = data.get("settings", {}).get("dataset", "counterfact")
    metrics = EDIT_METRICS.get(ds, ())
    out = [
        _curve_panels(data, [(_SHORT[m], "retention", (m,)) for m in metrics],
                      folder / "edit_metrics_vs_edits.png", {}),
    ]
    if _rows(data):  # final models to compare
        out.append(_se_vs_ote(data, metrics, folder / "se_vs_ote.png"))
    st = data.get("settings", {})
    panels: list[tuple[str, str, tuple[str, ...]]] = []
    if st.get("general_n"):
        panels.append(("mean F1", "curve", ("general", "mean_f1")))
        panels += [(f"{t} F1", "curve", ("general", "tasks", t, "f1")) for t in st.get("general_tasks", [])]
    if st.get("drift_windows"):
        panels += [("PPL", "curve", ("drift", "ppl")), ("top-1 agree", "curve", ("drift", "agreement"))]
    if panels:
        out.append(_curve_panels(data, panels, folder / "general_vs_edits.png", {"PPL": 1.0}))
    if (cohorts := _cohort_curves(data, metrics, folder / "retention_by_cohort.png")) is not None:
        out.append(cohorts)
    return out


PLOTS = ("edit_metrics_vs_edits.png", "se_vs_ote.png", "general_vs_edits.png", "retention_by_cohort.png")


def rendered(folder: str | Path) -> dict[str, Any] | None:
    """The report files already in ``folder`` (as :func:`render` returns them), or ``None`` if there is no report."""
    folder = Path(folder)
    if not (folder / "report.md").is_file():
        return None
    return {"markdown": str(folder / "report.md"), "plots": [str(folder / p) for p in PLOTS if (folder / p).is_file()]}


def render(folder: str | Path) -> dict[str, Any]:
    """Re-render ``report.md`` and the plots of ``folder/results.json``; returns the paths written."""
    return render_data(load_results(folder), folder)


def render_data(data: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """Write ``report.md`` and the plots of results ``data`` into ``folder``; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md = atomic_write_text(folder / "report.md", markdown(data))
    plots = render_plots(data, folder)
    return {"markdown": str(md), "plots": [str(p) for p in plots]}
