"""``seqedit eval``, ``seqedit report`` and ``seqedit compare``: the benchmark suite from one command,
re-rendering its report.md and plots from results.json, and one report over several folders."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..progress import Phase
from .common import (
    DeviceMapOpt, DtypeOpt, JsonOpt, LamOpt, LayersOpt, ModelOpt, PresetOpt, SetOpt, VStepsOpt, app, fail, load, out, parse_csv,
    parse_layers, parse_sets, progress_bars,
)

# the editor's STEPS bar restarts with every configuration of the run
_LABELS = {Phase.STEPS: "steps of this configuration"}


@app.command("eval")
def eval_(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder (results.json, report.md, plots); resumable."),
    model: str = ModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    dataset: str = typer.Option("counterfact", help="counterfact | zsre."),
    n: int = typer.Option(100, "--n", help="Number of facts edited (a seeded shuffle of the dataset)."),
    batch_size: int = typer.Option(100, "--batch-size", "-b", help="Facts per sequential (SE) step."),
    methods: str = typer.Option("memit", "--methods", help="Comma list: memit,alphaedit,prune,rect,rlsedit."),
    alignment: str = typer.Option("aligned", "--alignment", help="Comma list: aligned,naive (,uncorrected,full)."),
    modes: str = typer.Option("se,ote", "--modes", help="Comma list: se (sequential), ote (one-time)."),
    values: str = typer.Option(
        "current", help="current: SE optimises target values on the edited model at every step (the real "
        "sequential protocol); original: values optimised once on the unedited model and shared by every method "
        "and mode (isolates the solver)."),
    checkpoint: bool = typer.Option(
        False, "--checkpoint", help="SE configurations edit into ledgers under OUT/ledgers; an interrupted run "
        "continues from the last committed step (one fact per (subject, prompt) slot)."),
    rekey_every: int = typer.Option(0, "--rekey-every", help="With --checkpoint: every K SE steps, re-read the keys of "
        "all facts edited so far on the current model and re-solve from the base weights (seqedit ledger rekey; 0: never)."),
    seed: int = typer.Option(0, help="Seed of the record shuffle and of fluency sampling."),
    general_every: int = typer.Option(5, "--general-every", help="General capability + drift every K SE steps (0: final only)."),
    general_n: int = typer.Option(100, "--general-n", help="Examples per general task (0: skip the tasks)."),
    general_scoring: str = typer.Option("likelihood", "--general-scoring", help="likelihood | generation."),
    rte_inversion: bool = typer.Option(False, "--official-rte-inversion", help="Copy the official RTE label inversion."),
    retention_every: int = typer.Option(0, "--retention-every", help="Re-score the facts edited so far every K steps (0: off)."),
    drift_windows: int = typer.Option(32, "--drift-windows", help="256-token WikiText-2 test windows for drift (0: off)."),
    fluency_n: int = typer.Option(50, "--fluency-n", help="CounterFact records whose generations are scored (0: off)."),
    fluency_tokens: int = typer.Option(100, "--fluency-tokens", help="Tokens per generation, prompt included (ROME: 100)."),
    generation_n: int = typer.Option(0, "--generation-n", help="Facts (spread over the editing order) whose greedy "
        "continuations must begin with the target, at every edit measurement: generation efficacy (0: off)."),
    layout: str = typer.Option("knowedit", help="CounterFact layout: knowedit (20k cases) | rome (1,115-case subset)."),
    split: str = typer.Option("auto", help="CounterFact split: auto (= edit) | edit | train | all."),
    zsre_file: str = typer.Option("mend-eval", "--zsre-file", help="ZsRE file: mend-eval | mend-train | knowedit."),
    zsre_target: str = typer.Option("answers", "--zsre-target", help="ZsRE target: answers (answers[0], ROME) | alt (EasyEdit)."),
    facts: Optional[str] = typer.Option(None, "--facts", help="Facts file to draw from instead of the shared data."),
    layers: Optional[str] = LayersOpt,
    lam: Optional[float] = LamOpt,
    v_steps: Optional[int] = VStepsOpt,
    stats_tokens: Optional[int] = typer.Option(None, "--stats-tokens", help="Σ₀ token budget (default: preset)."),
    eval_batch_rows: int = typer.Option(64, "--eval-batch-rows", help="Rows per scoring forward."),
    prompt_format: str = typer.Option(
        "bare", "--prompt-format", help="Editing prompt format: bare | chat | both (chat, both: edit metrics are "
        "also measured through the chat template)."),
    chat_eval: bool = typer.Option(
        False, "--chat-eval", help="Also measure the edit metrics through the chat template (any --prompt-format)."),
    preset: Optional[str] = PresetOpt,
    sets: Optional[list[str]] = SetOpt,
    baseline_from: Optional[Path] = typer.Option(
        None, "--baseline-from", help="Adopt the pre-edit baseline of another results folder measured on the same "
        "model, facts and metrics (editing settings may differ) instead of measuring it again."),
    as_json: bool = JsonOpt,
) -> None:
    """Evaluate methods × alignments × SE/OTE on CounterFact or ZsRE: results.json, report.md and plots in --out."""
    from ..errors import SeqEditError
    from ..evaluate.config import EvalConfig
    from ..evaluate.results import check_out_dir
    from ..evaluate.runner import config_selection, run_eval
    from ..report import render, rendered

    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir} is a file; give a folder")
    overrides = parse_sets(sets, layers=parse_layers(layers), lam=lam, v_steps=v_steps, stats_tokens=stats_tokens)
    config = EvalConfig(
        model=model, dataset=dataset, n=n, batch_size=batch_size, methods=parse_csv(methods, "--methods"),
        alignments=parse_csv(alignment, "--alignment"), modes=parse_csv(modes, "--modes"), values=values, seed=seed,
        general_every=general_every, general_n=general_n, general_scoring=general_scoring,
        official_rte_inversion=rte_inversion, retention_every=retention_every, drift_windows=drift_windows,
        fluency_n=fluency_n, fluency_tokens=fluency_tokens, generation_n=generation_n, layout=layout, split=split, zsre_file=zsre_file, zsre_target=zsre_target,
        facts_path=facts, overrides=overrides,
        eval_batch_rows=eval_batch_rows, dtype=dtype, device_map=device_map, checkpoint=checkpoint,
        prompt_format=prompt_format, chat_eval=chat_eval, preset=preset, rekey_every=rekey_every,
    )
    try:
        t = time.perf_counter()
        check_out_dir(config, out_dir)  # bad settings or a clash with earlier results fail before loading
        config_selection(config)  # so does a bad --facts file
        lm, _ = load(model, dtype, device_map)
        with progress_bars(not as_json, _LABELS) as cb:
            data = run_eval(config, out_dir, cb, loaded=lm, baseline_from=baseline_from)
        last = data["runs"][-1]
        # nothing new since the last render: keep the files (plots cost ~1 s each)
        paths = (None if last["ran"] or last["reused"] else rendered(out_dir)) or render(out_dir)
    except (SeqEditError, ValueError, OSError) as e:
        fail(str(e))
    wall = time.perf_counter() - t
    summary = {
        label: {"final": {k: v for k, v in (e.get("final", {}).get("edit") or {}).items() if not isinstance(v, dict)},
                "chat": {k: v for k, v in ((e.get("final", {}).get("edit") or {}).get("chat") or {}).items()},
                "same_as": e.get("same_as"), "seconds": e.get("seconds")}
        for label, e in data["configs"].items()
    }
    if as_json:
        out.print_json(data={"out": str(out_dir), "results": str(Path(out_dir) / "results.json"), **paths,
                             "protocol": data["protocol"], "ran": last["ran"], "resumed": last["resumed"],
                             "reused": last["reused"], "skipped": data["skipped"], "wall_seconds": wall,
                             "baseline": data["baseline"].get("edit"), "configs": summary})
        return
    base = data["baseline"].get("edit") or {}
    metrics = [k for k in ("efficacy", "generalization", "specificity", "specificity_vs_pre_edit",
                           "specificity_vs_gold") if k in base]
    chat_metrics = [k for k in ("efficacy", "generalization", "specificity", "answer_new") if k in (base.get("chat") or {})]

    def cells(edit: dict) -> list[str]:
        return [f"{100 * (edit[m] or 0):.1f}" for m in metrics] + [f"{100 * (edit['chat'][m] or 0):.1f}" for m in chat_metrics]

    table = Table(title=f"{dataset}: {n} edits on {data['model']['name']} (values: {values}; "
                        f"prompt format: {prompt_format}; ×100)")
    for col in ("config", *metrics, *[f"chat {m}" for m in chat_metrics], "note"):
        table.add_column(col, justify="left" if col in ("config", "note") else "right")
    table.add_row("pre-edit", *cells(base), "")
    for label, e in data["configs"].items():
        note = f"= {e['same_as']}" if e.get("same_as") else ("resumed" if label in last["resumed"] else "")
        table.add_row(label, *cells(e["final"]["edit"]), note)
    out.print(table)
    for s in data["skipped"]:
        out.print(f"skipped {s['config']}: {s['reason']}")
    out.print(f"wrote {Path(out_dir) / 'results.json'}, {paths['markdown']} and {len(paths['plots'])} plots "
              f"in {wall:.0f} s")


@app.command()
def report(
    folder: Path = typer.Argument(..., help="An eval output folder (holding results.json)."),
    as_json: bool = JsonOpt,
) -> None:
    """Re-render report.md and the PNG plots of an eval folder from its results.json."""
    from ..report import render

    try:
        paths = render(folder)
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot render {folder}: {e}")
    if as_json:
        out.print_json(data=paths)
        return
    out.print(f"wrote {paths['markdown']} and {len(paths['plots'])} plots")


@app.command()
def compare(
    folders: list[Path] = typer.Argument(..., help="Two or more eval output folders measured on the same model, "
                                         "facts and metrics (e.g. the later ones made with --baseline-from the first)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the joint report.md and plots."),
    join: bool = typer.Option(False, "--join", help="A configuration held by several folders is one run measured "
                              "in parts (stopped, then run again to its end with the same settings): draw it as one "
                              "curve instead of one per folder."),
    as_json: bool = JsonOpt,
) -> None:
    """One report.md and one set of plots over several eval folders (aligned vs naive run apart, presets side by side)."""
    from ..evaluate.compare import merge
    from ..evaluate.config import EvalSettingsError
    from ..report import render_data

    try:
        paths = render_data(merge(folders, join=join), out_dir)
    except (EvalSettingsError, OSError, ValueError, KeyError) as e:
        fail(f"cannot compare: {e}")
    if as_json:
        out.print_json(data=paths)
        return
    out.print(f"wrote {paths['markdown']} and {len(paths['plots'])} plots over {len(folders)} folders")
