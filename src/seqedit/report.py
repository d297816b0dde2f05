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

from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .report_data import EDIT_METRICS, SHORT_NAMES, cohort_points, config_rows, get_path, load_results
from .report_plots import PLOTS, render_plots, save_png

__all__ = ["EDIT_METRICS", "PLOTS", "load_results", "markdown", "render", "render_data", "render_plots", "rendered",
           "save_png"]

def _fmt(x: Any, scale: float = 100.0, digits: int = 1) -> str:
    return "–" if x is None else f"{x * scale:.{digits}f}"


def _mark(entry: dict | None) -> str:
    """† the run itself was not made (identical to another); ‡ its final model was bit-identical to
    another configuration's, whose final-model scores it shares."""
    return "†" if get_path(entry, "same_as") else "‡" if get_path(entry, "final_reused_from") else ""


def _cell(e: dict[str, dict], path: tuple[str, ...], scale: float, digits: int) -> str:
    se = _fmt(get_path(e.get("se"), *path), scale, digits) + _mark(e.get("se")) if "se" in e else "·"
    ote = _fmt(get_path(e.get("ote"), *path), scale, digits) + _mark(e.get("ote")) if "ote" in e else "·"
    return f"{se} \\| {ote}"


def _table(data: dict, columns: list[tuple[str, tuple[str, ...], float, int]]) -> list[str]:
    head = "| Method | Alignment | " + " | ".join(c[0] for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    base = data.get("baseline", {})
    lines.append("| pre-edit | – | " + " | ".join(_fmt(get_path(base, *p), s, d) for _, p, s, d in columns) + " |")
    for (m, a), e in config_rows(data).items():
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
    cols = [(SHORT_NAMES[m], ("final", "edit", m), 100.0, 1) for m in EDIT_METRICS.get(ds, ())]
    fluency_on = ds == "counterfact" and bool(st.get("fluency_n", 1))
    if fluency_on:
        cols.append(("Flu. (×100)", ("final", "fluency", "fluency"), 100.0, 1))
    lines += _table(_unwrap_baseline(data), cols)
    if get_path(data, "baseline", "edit", "chat") is not None:  # evaluate/chat.py: the facts asked as questions
        lines += ["", f"Asked through the chat template (editing prompt format **{st.get('prompt_format', 'bare')}**; "
                      "Ans. = the greedy reply's first sentence names the new target):", ""]
        lines += _table(_unwrap_baseline(data), [(f"Chat {SHORT_NAMES.get(m, 'Ans.')}", ("final", "edit", "chat", m), 100.0, 1)
                                                 for m in ("efficacy", "generalization", "specificity", "answer_new")])
    if ds == "counterfact":
        flu = get_path(data, "baseline", "fluency") or {}
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
                     f"{s.get('evaluation', 0):.1f} | {_fmt(get_path(e, 'final', 'edit', 'records_per_second'), 1, 1)} |")
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
    base_ppl = get_path(data, "baseline", "drift", "ppl")
    out: list[str] = []
    for (m, a), e in config_rows(data, running=True).items():
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
                "| edits | " + " | ".join(SHORT_NAMES[k] for k in metrics) + " | PPL | ΔPPL | top-1 agree | mean F1 |",
                "|---:|" + "---:|" * (len(metrics) + 4)]
        base = data.get("baseline", {})
        rows = [(0, {**base, "pre": True})] + sorted(points.items())
        for edits, p in rows:
            ppl = get_path(p, "drift", "ppl")
            rel = "–" if ppl is None or not base_ppl or p.get("pre") else f"{100 * (ppl / base_ppl - 1):+.1f} %"
            label = "pre-edit" if p.get("pre") else f"{edits:,}" + (" (final)" if p.get("final") else "")
            out.append(f"| {label} | " + " | ".join(_fmt(get_path(p, "edit", k)) for k in metrics)
                       + f" | {_fmt(ppl, 1, 2)} | {rel} | {_fmt(get_path(p, 'drift', 'agreement'))} | "
                       f"{_fmt(get_path(p, 'general', 'mean_f1'))} |")
        out.append("")
    return out[:-1] if out else out


def _unfinished(se: dict, settings: dict) -> str:
    """`` (unfinished: …)`` for an entry still running, else ``""``."""
    if se.get("status") != "running":
        return ""
    return f" (unfinished: {se.get('edited', 0):,} of {settings.get('n', 0):,} facts edited so far)"


def _by_cohort(data: dict) -> list[str]:
    """Retention of early against late edits: one row per cohort (the facts edited between two retention
    points), one column per retention point, cells ``Eff. / Gen.`` of that cohort on that model."""
    metrics = EDIT_METRICS.get(data.get("settings", {}).get("dataset", "counterfact"), ())[:2]
    out: list[str] = []
    for (m, a), e in config_rows(data, running=True).items():
        points = cohort_points(e.get("se") or {})
        if len(points) < 2:  # one point has one cohort, which the table along the run already shows
            continue
        if not out:
            out += ["", "## Retention by cohort (" + " / ".join(SHORT_NAMES[k] for k in metrics)
                    + " of the facts edited in each stretch, re-scored at each retention point)", ""]
        base = {tuple(c["facts"]): c for c in get_path(data, "baseline", "edit", "by_cohort") or []}
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
