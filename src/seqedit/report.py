"""Tables and plots of an evaluation run, rendered from ``results.json`` alone.

``render(folder)`` writes ``report.md`` (the paper's layout: one row per method/alignment, one column
per metric, each cell ``SE | OTE``) and small PNG plots (matplotlib, Agg backend):

* ``edit_metrics_vs_edits.png`` — efficacy / generalization / specificity (and generation efficacy,
  where measured) against the number of edits (SE retention curve where recorded, else the final
  point; OTE as a cross at n; pre-edit at 0);
* ``se_vs_ote.png`` — final metrics, SE and OTE side by side per method/alignment;
* ``general_vs_edits.png`` — general-task F1 (mean and per task), WikiText-2 perplexity and top-1
  agreement against the number of edits;
* ``retention_by_cohort.png`` — where retention points carry per-cohort means: each cohort's (the facts
  edited between two retention points) metrics against the number of edits, early cohorts dark.
* ``weight_drift_vs_edits.png`` — where steps record it: ‖W_ℓ − W₀,ℓ‖_F of every edited layer against
  the number of edits, one panel per layer.

The table along the run gains a generation-efficacy column and one for the largest ‖W_ℓ − W₀,ℓ‖_F where
the run recorded them.

Colour = method, line style = alignment (solid aligned, dashed otherwise), so aligned vs naive reads
off each panel. Rates are ×100 in the table, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .atomic import atomic_write_text
from .evaluate.schema import (ConfigEntry, ConfigSeconds, DriftSummary, EditMetrics, FinalMetrics, FluencySummary,
                              GeneralSummary, Protocol, ResultsFile, Settings, Versions)
from .report_data import (EDIT_METRICS, SHORT_NAMES, Getter, as_results, cohort_points, config_rows, drift_metric,
                          edit_metric, f1, generation_efficacy, load_results, of_drift, of_edit, of_f1, step_points)
from .report_plots import PLOTS, render_plots, save_png

__all__ = ["EDIT_METRICS", "PLOTS", "load_results", "markdown", "render", "render_data", "render_plots", "rendered",
           "save_png"]

T = TypeVar("T")
# (title, the value of a final model or the baseline, scale, digits)
Column = tuple[str, Getter, float, int]


def _or(x: T | None, default: T) -> T:
    """``x`` unless it is missing (``None``): the report's wording for a key an older file lacks."""
    return default if x is None else x


def _fmt(x: Any, scale: float = 100.0, digits: int = 1) -> str:
    return "–" if x is None else f"{x * scale:.{digits}f}"


def _mark(entry: ConfigEntry | None) -> str:
    """† the run itself was not made (identical to another); ‡ its final model was bit-identical to
    another configuration's, whose final-model scores it shares."""
    return "" if entry is None else "†" if entry.same_as else "‡" if entry.final_reused_from else ""


def _final(entry: ConfigEntry | None, get: Getter) -> Any:
    return None if entry is None or entry.final is None else get(entry.final)


def _cell(e: dict[str, ConfigEntry], get: Getter, scale: float, digits: int) -> str:
    se = _fmt(_final(e.get("se"), get), scale, digits) + _mark(e.get("se")) if "se" in e else "·"
    ote = _fmt(_final(e.get("ote"), get), scale, digits) + _mark(e.get("ote")) if "ote" in e else "·"
    return f"{se} \\| {ote}"


def _table(data: ResultsFile, columns: list[Column]) -> list[str]:
    head = "| Method | Alignment | " + " | ".join(c[0] for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    base = data.baseline
    pre = [_fmt(None if base is None else get(base), s, d) for _, get, s, d in columns]
    lines.append("| pre-edit | – | " + " | ".join(pre) + " |")
    for (m, a), e in config_rows(data).items():
        lines.append(f"| {m} | {a} | " + " | ".join(_cell(e, g, s, d) for _, g, s, d in columns) + " |")
    return lines


def _source(settings: Settings) -> str:
    """Where the records came from, e.g. ``counterfact (knowedit layout, train split)``."""
    ds = _or(settings.dataset, "counterfact")
    if settings.facts_path:
        where = [f"file {settings.facts_path}"]
    elif ds == "counterfact":
        where = [f"{_or(settings.layout, 'knowedit')} layout"]
        where += [f"{settings.split} split"] if settings.split else []
    else:
        where = [f"{_or(settings.zsre_file, 'mend-eval')} file"]
    return f"{ds} ({', '.join(where)})"


def _fluency(m: FinalMetrics) -> float | None:
    return None if m.fluency is None else m.fluency.fluency


# the values protocol in the title line: a reader must not mistake a solver-isolating run for the real one
_PROTOCOL_TITLE = {"current": "real sequential protocol (values on the current model)",
                   "original": "frozen values (on the unedited model; isolates the solver)"}


def markdown(data: ResultsFile | Mapping[str, Any]) -> str:
    """The report as markdown (tables in the paper's layout plus the protocol and timings)."""
    data = as_results(data)
    st, proto = data.settings or Settings(), data.protocol or Protocol()
    ds = _or(st.dataset, "counterfact")
    lines = [
        f"# seqedit evaluation: {_source(st)}, {st.n} edits, {data.model.name if data.model else None}, "
        f"{_PROTOCOL_TITLE.get(proto.values, 'values ' + str(proto.values))}"
        + (f", rekeyed every {st.rekey_every} steps" if st.rekey_every else ""),
        "",
        f"Batch size {st.batch_size} per sequential step; seed {st.seed} "
        f"(records: {_or(data.selection.method if data.selection else None, 'seeded shuffle')}); "
        f"values protocol **{proto.values}**: {proto.values_description}.",
        f"Evaluation: {proto.evaluation}. Cells are **SE \\| OTE**; rates ×100.",
        "",
        "## Editing metrics (final model)",
        "",
    ]
    cols: list[Column] = [(SHORT_NAMES[m], of_edit(m), 100.0, 1) for m in EDIT_METRICS.get(ds, ())]
    fluency_on = ds == "counterfact" and bool(_or(st.fluency_n, 1))
    if fluency_on:
        cols.append(("Flu. (×100)", _fluency, 100.0, 1))
    lines += _table(data, cols)
    base = data.baseline
    # evaluate/chat.py: the facts asked as questions
    if base is not None and base.edit is not None and base.edit.chat is not None:
        lines += ["", f"Asked through the chat template (editing prompt format **{_or(st.prompt_format, 'bare')}**; "
                      "Ans. = the greedy reply's first sentence names the new target):", ""]
        lines += _table(data, [(f"Chat {SHORT_NAMES.get(m, 'Ans.')}", of_edit(m, chat=True), 100.0, 1)
                               for m in ("efficacy", "generalization", "specificity", "answer_new")])
    if ds == "counterfact":
        flu = (base.fluency if base is not None else None) or FluencySummary()
        missing = _or(flu.n_without_prompts, 0)
        what = (f"Fluency on {_or(flu.n_records, 0)} records' ROME generation prompts "
                f"({_or(flu.n_texts, 0)} sampled texts"
                + (f"; {missing} selected records have none: KnowEdit-layout records get them only by case id "
                   "from the 1,115-case ROME subset)." if missing else ").")
                if fluency_on
                else "Fluency not measured (--fluency-n 0).")
        lines += ["", f"{what} {_or(proto.consistency, '')}"]
    else:
        lines += ["", f"ZsRE target convention: {proto.zsre_target}. {proto.zsre_specificity}."]
    tasks = list(_or(st.general_tasks, ())) if st.general_n else []
    drift_on = bool(st.drift_windows)
    if tasks or drift_on:
        parts = [f"General capability (F1 ×100, {proto.general_scoring} scoring, {st.general_n} items "
                 "per task)"] if tasks else []
        parts += [f"WikiText-2 test drift ({st.drift_windows} windows of {st.drift_window} tokens)"] if drift_on else []
        lines += ["", "## " + " and ".join(parts), ""]
        gcols: list[Column] = [(t, of_f1(t), 100.0, 1) for t in tasks]
        if tasks:
            gcols.append(("mean F1", of_f1(), 100.0, 1))
        if drift_on:
            gcols += [("PPL", of_drift("ppl"), 1.0, 2), ("top-1 agree", of_drift("agreement"), 100.0, 1)]
        lines += _table(data, gcols)
        if tasks:
            lines += ["", f"RTE: {proto.rte_labels}."]
    lines += _along_the_run(data) + _by_cohort(data) + _sources(data)
    same = [lbl for lbl, e in data.configs.items() if e.same_as]
    if same:
        lines += ["", "† " + "; ".join(f"{lbl} is the identical one-step solve of {data.configs[lbl].same_as}: "
                                      "numbers reused, not re-run" for lbl in same) + "."]
    shared = [(lbl, e.final_reused_from) for lbl, e in data.configs.items() if e.final_reused_from and not e.same_as]
    if shared:
        lines += ["", "‡ " + "; ".join(f"{lbl} ended on float32 weights bit-identical to {src}'s (sha256 of the edited "
                                      "layers), so it shares that final model's scores" for lbl, src in shared) + "."]
    pending = [lbl for lbl in data.planned if (c := data.configs.get(lbl)) is None or c.status != "done"]
    if pending:
        lines += ["", f"**Unfinished run**: {len(pending)} planned configurations not yet evaluated "
                      f"({', '.join(pending)}); rerun the same `seqedit eval` command to resume."]
    if data.skipped:
        lines.append("")
    for s in data.skipped:
        lines.append(f"Skipped {s.config}: {s.reason}.")
    lines += ["", "## Timings", "", "| Config | steps | edit s | mean step s | eval s | scoring records/s |",
              "|---|---|---|---|---|---|"]
    for label, e in data.configs.items():
        if e.status != "done" or e.same_as:
            continue
        t = e.seconds or ConfigSeconds()
        rate = e.final.edit.records_per_second if e.final is not None and e.final.edit is not None else None
        lines.append(f"| {label} | {e.n_steps} | {_or(t.edit, 0):.1f} | {_or(t.mean_step, 0):.1f} | "
                     f"{_or(t.evaluation, 0):.1f} | {_fmt(rate, 1, 1)} |")
    v = data.versions or Versions()
    lines += ["", f"Versions: seqedit {v.seqedit} ({v.git_commit or 'no git'}), torch {v.torch}, "
                  f"transformers {v.transformers}, python {v.python}, {v.torch_threads} threads."]
    return "\n".join(lines) + "\n"


@dataclass
class _Row:
    """One row of a table along the run: the measurements at one number of edits."""

    edit: EditMetrics | None = None
    general: GeneralSummary | None = None
    drift: DriftSummary | None = None
    final: bool = False
    pre: bool = False


def _along_the_run(data: ResultsFile) -> list[str]:
    """One table per sequential configuration with intermediate points: the edit metrics of all facts
    edited so far (retention), perplexity (and its change from pre-edit), top-1 agreement and mean F1,
    one row per number of edits, the final model last. Empty when no configuration recorded any."""
    st = data.settings or Settings()
    metrics = EDIT_METRICS.get(_or(st.dataset, "counterfact"), ())
    base = data.baseline
    base_ppl = None if base is None else drift_metric(base.drift, "ppl")
    out: list[str] = []
    for (m, a), e in config_rows(data, running=True).items():
        se = e.get("se")
        if not se or not (se.retention or se.curve):
            continue
        points: dict[int, _Row] = {}
        for p in se.retention:
            points.setdefault(p.edits, _Row()).edit = p
        for c in se.curve:
            row = points.setdefault(c.edits, _Row())
            row.general, row.drift = c.general, c.drift
        if se.final is not None:
            points[st.n or max(points)] = _Row(se.final.edit, se.final.general, se.final.drift, final=True)
        # generation efficacy and the weight drift get columns where the run measured them
        gen = any(generation_efficacy(r.edit) is not None for r in points.values())
        drift = {p.edits: p.largest for p in step_points(se, st.batch_size)}
        extra = (["G-eff"] if gen else []) + (["‖ΔW‖"] if drift else [])
        if not out:
            out += ["", "## Along the run (sequential edits; edit metrics of all facts edited so far)", ""]
            if drift:
                out += ["‖ΔW‖: the largest ‖W_ℓ − W₀,ℓ‖_F over the edited layers; G-eff: the share of greedy "
                        "continuations that begin with the target.", ""]
        out += [f"**{m} / {a}**" + _unfinished(se, st), "",
                "| edits | " + " | ".join(SHORT_NAMES[k] for k in metrics) + " | PPL | ΔPPL | top-1 agree | mean F1 |"
                + "".join(f" {x} |" for x in extra),
                "|---:|" + "---:|" * (len(metrics) + 4 + len(extra))]
        pre = _Row(pre=True) if base is None else _Row(base.edit, base.general, base.drift, pre=True)
        for edits, r in [(0, pre)] + sorted(points.items()):
            ppl = drift_metric(r.drift, "ppl")
            rel = "–" if ppl is None or not base_ppl or r.pre else f"{100 * (ppl / base_ppl - 1):+.1f} %"
            label = "pre-edit" if r.pre else f"{edits:,}" + (" (final)" if r.final else "")
            cells = ([_fmt(generation_efficacy(r.edit))] if gen else []) + (
                [_fmt(0.0 if r.pre else drift.get(edits), 1, 1)] if drift else [])
            out.append(f"| {label} | " + " | ".join(_fmt(edit_metric(r.edit, k)) for k in metrics)
                       + f" | {_fmt(ppl, 1, 2)} | {rel} | {_fmt(drift_metric(r.drift, 'agreement'))} | "
                       f"{_fmt(f1(r.general))} |" + "".join(f" {c} |" for c in cells))
        out.append("")
    return out[:-1] if out else out


def _unfinished(se: ConfigEntry, settings: Settings) -> str:
    """`` (unfinished: …)`` for an entry still running, else ``""``."""
    if se.status != "running":
        return ""
    return f" (unfinished: {_or(se.edited, 0):,} of {_or(settings.n, 0):,} facts edited so far)"


def _by_cohort(data: ResultsFile) -> list[str]:
    """Retention of early against late edits: one row per cohort (the facts edited between two retention
    points), one column per retention point, cells ``Eff. / Gen.`` of that cohort on that model."""
    st = data.settings or Settings()
    metrics = EDIT_METRICS.get(_or(st.dataset, "counterfact"), ())[:2]
    base_edit = data.baseline.edit if data.baseline is not None else None
    out: list[str] = []
    for (m, a), e in config_rows(data, running=True).items():
        se = e.get("se")
        points = cohort_points(se) if se is not None else []
        if len(points) < 2:  # one point has one cohort, which the table along the run already shows
            continue
        if not out:
            out += ["", "## Retention by cohort (" + " / ".join(SHORT_NAMES[k] for k in metrics)
                    + " of the facts edited in each stretch, re-scored at each retention point)", ""]
        base = {c.facts: c for c in (base_edit.by_cohort if base_edit is not None else None) or ()}
        heads = (["pre-edit"] if base else []) + [f"after {p.edits:,}" for p in points]
        out += [f"**{m} / {a}**" + _unfinished(se, st), "",
                "| facts | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for cohort in points[-1].by_cohort or ():
            key = cohort.facts
            cells = [base.get(key)] if base else []
            cells += [next((c for c in p.by_cohort or () if c.facts == key), None) for p in points]
            row = [" / ".join(_fmt(c.metric(k)) for k in metrics) if c else "" for c in cells]
            out.append(f"| {key[0]:,}–{key[1]:,} | " + " | ".join(row) + " |")
        out.append("")
    return out[:-1] if out else out


def _sources(data: ResultsFile) -> list[str]:
    """The folders a comparison (:func:`seqedit.evaluate.compare.merge`) was merged from."""
    if not data.sources:
        return []
    out = ["", "## Sources", "",
           "Merged from these results folders (one pre-edit baseline: the same model, facts and metrics; the "
           "first folder's is shown):", "",
           "| folder | configurations | values | prompt format | batch | preset | hyperparameters unlike the first folder's | commit |",
           "|---|---|---|---|---:|---|---|---|"]
    for s in data.sources:
        hp = "; ".join(f"{k} = {new!r} (first: {old!r})" for k, (old, new) in s.hparams_vs_first.items())
        out.append(f"| `{s.folder}` | {', '.join(s.configs)} | {s.values} | {s.prompt_format} | "
                   f"{s.batch_size} | {s.preset or 'default'} | {hp or '–'} | {(s.commit or 'no git')[:10]} |")
    for label, e in data.configs.items():
        if e.joined_from:
            out += ["", f"**{label}** is one run measured in parts (`--join`): its points along the run come from "
                    + " and ".join(f"`{f}`" for f in e.joined_from) + ", its final model from the folder that has one."]
    return out


def rendered(folder: str | Path) -> dict[str, Any] | None:
    """The report files already in ``folder`` (as :func:`render` returns them), or ``None`` if there is no report."""
    folder = Path(folder)
    if not (folder / "report.md").is_file():
        return None
    return {"markdown": str(folder / "report.md"), "plots": [str(folder / p) for p in PLOTS if (folder / p).is_file()]}


def render(folder: str | Path) -> dict[str, Any]:
    """Re-render ``report.md`` and the plots of ``folder/results.json``; returns the paths written."""
    return render_data(load_results(folder), folder)


def render_data(data: ResultsFile | Mapping[str, Any], folder: str | Path) -> dict[str, Any]:
    """Write ``report.md`` and the plots of results ``data`` (typed, or a results.json dict) into
    ``folder``; returns the paths written."""
    data = as_results(data)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md = atomic_write_text(folder / "report.md", markdown(data))
    plots = render_plots(data, folder)
    return {"markdown": str(md), "plots": [str(p) for p in plots]}
