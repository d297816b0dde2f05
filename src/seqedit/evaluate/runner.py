"""The evaluation run: methods × alignments × modes on one seeded selection of facts, resumable.

``run_eval(EvalConfig(...), out_dir)`` edits the same ``n`` facts with every requested configuration
(method, alignment, mode ∈ {se, ote}), each from the base weights, and scores the FINAL model of each
(the paper's protocol, REFERENCE_NOTES §1.7), plus optional curves: general capability and drift every
``general_every`` steps, and retention (the facts edited so far re-scored) every ``retention_every``
steps. Everything lands in ``out_dir/results.json``, written atomically after the baseline and after
every completed configuration; a rerun with the same settings skips what is done, other settings in
the same folder raise :class:`EvalSettingsError`.

Values protocol (``values``): ``original`` optimises every fact's target value once, on the unedited
model, and every method and mode uses those (:func:`~seqedit.locate.frozen.frozen_targets`; OTE does so
by definition, so SE vs OTE then isolates the solver). ``current`` is the real SE protocol: each SE
step optimises its values on the current, already edited model. Keys are always read on the current
model, layer by layer, as the editor does.

This module owns the run (``_Run``, :func:`run_eval`); the settings and the plan are
:mod:`seqedit.evaluate.config`, the results.json store :mod:`seqedit.evaluate.results` and what it
holds :mod:`seqedit.evaluate.schema` (the run builds those objects).
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..facts import Fact
from ..progress import Phase, ProgressCallback, ProgressEvent, counter, emit
from ..rekey import rekey_due
from ..steps import RunPosition, StepReport
from .config import MODES, VALUES_PROTOCOL, EvalConfig, EvalSettingsError, plan, union_in_order
from .fluency import CONSISTENCY_UNAVAILABLE
from .generation_efficacy import generation_efficacy
from .measure import References, drift_summary, edit_summary, general_summary
from .results import (FORMAT, ResultsStore, baseline_differences, differences, library_versions, read_measured,
                      scored_finals, utc_now, weights_sha)
from .schema import (Baseline, ConfigEntry, ConfigSeconds, CurvePoint, DriftSummary, EditMetrics, FinalMetrics,
                     FluencySummary, GeneralSummary, ModelInfo, Protocol, Requested, ResultsFile, RetentionPoint,
                     RunRecord, SelectionRecord, Settings, Skipped, StepRecord, Versions)
from .selection import Selection, select_facts

__all__ = ["run_eval"]

def _step_record(report: dict[str, Any]) -> StepRecord:
    """A step report as results.json keeps it (``StepReport.to_dict()``, or the copy a ledger journals)."""
    # the selection's order already names the facts
    return StepRecord.from_dict({k: v for k, v in report.items() if k != "fact_ids"}, at="step report")


class _Offset:
    """A value source seen from fact ``offset`` on (a resumed run edits ``facts[offset:]``)."""

    def __init__(self, source, offset: int):
        self.source, self.offset = source, offset

    def value_result(self, lo: int = 0, hi: int | None = None):
        return self.source.value_result(self.offset + lo, None if hi is None else self.offset + hi)


def ledger_folder(folder: Path, label: str) -> Path:
    """Where a checkpointed configuration keeps its ledger: ``<out>/ledgers/<method>-<alignment>-<mode>``."""
    return folder / "ledgers" / label.replace("/", "-")


class _Run:
    """State shared by the configurations of one ``run_eval`` call."""

    def __init__(self, config: EvalConfig, loaded, hp, selection: Selection, folder: Path,
                 progress: ProgressCallback | None):
        self.cfg, self.lm, self.hp, self.sel, self.folder, self.progress = config, loaded, hp, selection, folder, progress
        self.facts: list[Fact] = selection.facts
        self.base = {l: loaded.adapter.weight(l).detach().clone() for l in hp.layers}
        self.refs: References | None = None
        self._targets = None

    def say(self, what: str) -> None:
        emit(self.progress, ProgressEvent(Phase.STATUS, message=what))

    def restore(self) -> None:
        for layer, w in self.base.items():
            self.lm.adapter.set_weight(layer, w)

    def targets(self):
        """Frozen keys/values of the selected facts on the unedited model (disk-cached)."""
        if self._targets is None:
            from ..locate.frozen import frozen_targets
            from ..locate.templates import context_templates

            hp = self.hp
            self.restore()
            templates = context_templates(self.lm, hp.n_context_templates, hp.context_template_len, hp.template_seed)
            self.say("target values on the unedited model")
            emit(self.progress, ProgressEvent(Phase.VALUES, total=len(self.facts), start=True))
            self._targets = frozen_targets(self.lm, self.facts, templates, hp, progress=counter(self.progress, Phase.VALUES),
                                           prompt_format=self.cfg.prompt_format)
        return self._targets

    # ---------------------------------------------------------------- measurements
    def edit(self, facts: list[Fact]) -> EditMetrics:
        self.say(f"{self.cfg.dataset} metrics on {len(facts)} facts")
        c = self.cfg
        # retention cohorts: the facts edited between two retention points
        out = edit_summary(self.lm, c.dataset, facts, self.refs, c.eval_batch_rows, chat=c.chat_metrics,
                           cohort=c.retention_every * c.batch_size if c.retention_every else None,
                           progress=self.progress)
        if c.generation_n:
            self.say(f"generation efficacy on {min(c.generation_n, len(facts))} facts")
            gen = generation_efficacy(self.lm, facts, limit=c.generation_n, batch_rows=c.eval_batch_rows)
            out["generation"] = {k: gen[k] for k in ("generation_efficacy", "generation_generalization", "n_records")}
        return EditMetrics.from_dict(out, at="edit metrics")

    def capability(self) -> tuple[GeneralSummary | None, DriftSummary | None]:
        """General capability and drift (``None`` where turned off)."""
        c = self.cfg
        self.say("general capability")
        gen = general_summary(self.lm, c.general_tasks, c.general_n, c.general_scoring, c.official_rte_inversion,
                              c.eval_batch_rows)
        self.say("WikiText-2 drift")
        drift = drift_summary(self.lm, self.refs)
        return (None if gen is None else GeneralSummary.from_dict(gen, at="general"),
                None if drift is None else DriftSummary.from_dict(drift, at="drift"))

    def fluency(self) -> FluencySummary | None:
        if self.cfg.dataset != "counterfact" or self.cfg.fluency_n == 0:
            return None
        from .cf_fluency import counterfact_fluency

        self.say("fluency (sampling generations)")
        t = time.perf_counter()
        out = counterfact_fluency(self.lm, self.facts, self.cfg.fluency_n, seed=self.cfg.seed,
                                  max_total_tokens=self.cfg.fluency_tokens,
                                  batch_rows=max(1, self.cfg.eval_batch_rows // 2))
        return FluencySummary.from_dict({**out, "seconds": time.perf_counter() - t}, at="fluency")

    def final(self) -> FinalMetrics:
        edit = self.edit(self.facts)
        general, drift = self.capability()
        return FinalMetrics(edit=edit, general=general, drift=drift, fluency=self.fluency())

    # ---------------------------------------------------------------- runs
    def baseline(self) -> Baseline:
        self.restore()
        t = time.perf_counter()
        self.say("pre-edit references")
        c = self.cfg
        self.refs = References.compute(self.lm, c.dataset, self.facts, c.drift_window, c.drift_windows,
                                       c.eval_batch_rows)
        self.refs.save(self.folder)
        f = self.final()
        return Baseline(edit=f.edit, general=f.general, drift=f.drift, fluency=f.fluency,
                        seconds=time.perf_counter() - t)

    def final_weights_sha(self) -> str:
        return weights_sha({l: self.lm.adapter.weight(l) for l in self.hp.layers})

    def config(self, method: str, alignment: str, mode: str, scored: dict[str, tuple[str, FinalMetrics]],
               partial: ConfigEntry | None = None,
               save: Callable[[ConfigEntry], None] | None = None) -> ConfigEntry:
        """Run one configuration. ``scored`` maps the final-weights sha256 of configurations already
        scored to ``(label, final metrics)`` (see :func:`scored_finals`).

        With ``checkpoint`` set, an SE configuration edits into a ledger (:func:`ledger_folder`) and
        ``save`` receives the entry so far after every step; ``partial`` (that entry, from an
        interrupted run) continues it from the ledger's last committed step.
        """
        from ..editor import Editor

        c, n = self.cfg, len(self.facts)
        label = f"{method}/{alignment}/{mode}"
        frozen = c.values == "original" or mode == "ote"
        targets = self.targets() if frozen else None
        self.restore()
        t_start = time.perf_counter()
        ledger = ledger_folder(self.folder, label) if c.checkpoint and mode == "se" else None
        # The ledger is the truth of what was edited: a run killed after a commit but before results.json
        # was written continues from it too (the folder's settings and the ledger's manifest both match).
        prior = partial if partial is not None and ledger is not None and ledger.exists() else None
        steps: list[StepRecord] = list(prior.steps) if prior else []
        curve: list[CurvePoint] = list(prior.curve) if prior else []
        retention: list[RetentionPoint] = list(prior.retention) if prior else []
        spent = (prior.seconds_so_far if prior else None) or ConfigSeconds()
        spent_edit, spent_eval = spent.edit or 0.0, spent.evaluation or 0.0
        eval_s = 0.0

        def entry(done_edits: int) -> ConfigEntry:
            return ConfigEntry.running(method=method, alignment=alignment, mode=mode, steps=tuple(steps),
                                       curve=tuple(curve), retention=tuple(retention), edited=done_edits,
                                       ledger=str(ledger),
                                       seconds_so_far=ConfigSeconds(edit=spent_edit + time.perf_counter() - t0 - eval_s,
                                                                    evaluation=spent_eval + eval_s))

        def measure(step: int, edited: int) -> None:
            nonlocal eval_s
            t1 = time.perf_counter()
            if c.general_every and step % c.general_every == 0 and not any(p.step == step for p in curve):
                general, drift = self.capability()
                curve.append(CurvePoint(step=step, edits=edited, general=general, drift=drift))
            if c.retention_every and step % c.retention_every == 0 and not any(p.step == step for p in retention):
                retention.append(RetentionPoint.of(self.edit(self.facts[:edited]), edits=edited, step=step))
            eval_s += time.perf_counter() - t1

        done = 0  # steps already committed (a resumed checkpoint)
        total_steps = -(-n // c.batch_size) if mode == "se" else 1

        class Measure:  # between steps: the curves (the final model is scored below, after finalize)
            def on_step_end(_, editor: Editor, report: StepReport, at: RunPosition) -> None:
                step, edited = done + at.step, done * c.batch_size + at.edited
                steps.append(_step_record(report.to_dict()))
                if step < total_steps:
                    measure(step, edited)
                if save is not None:
                    save(entry(edited))

        t0 = time.perf_counter()
        editor = Editor(self.lm, method=method, mode=MODES[mode], alignment=alignment, hparams=self.hp,
                        stats_corpus=c.stats_corpus, callbacks=[Measure()], prompt_format=c.prompt_format,
                        **({"ledger": ledger, "kv_dtype": "float32"} if ledger is not None else {}))
        if ledger is not None:
            applied = [r for r in editor.ledger.steps() if r.kind == "apply"]
            done = len(applied)
            # committed, but killed before results.json was written
            steps += [_step_record(r.info.get("report", {})) for r in applied[len(steps):]]
            if done:
                self.say(f"resuming {label} after step {done} of {total_steps} (ledger {ledger})")
                if rekey_due(done, c.rekey_every) and editor.ledger.step(editor.ledger.last_step).kind == "apply":
                    editor.rekey(self.progress)  # killed between a due step and its rekey
                if done < total_steps:
                    measure(done, done * c.batch_size)
        rest = self.facts[done * c.batch_size:]
        values = None
        if frozen:
            values = _Offset(targets, done * c.batch_size) if done else targets
        self.say("editing")
        editor.run(rest, c.batch_size, self.progress, values=values, rekey_every=c.rekey_every if ledger is not None else 0)
        edit_s = spent_edit + time.perf_counter() - t0 - eval_s
        eval_s += spent_eval
        t0 = time.perf_counter()
        # Bit-identical weights give bit-identical scores, so such a final model is scored once (e.g. a
        # one-step SE and its OTE; over several steps SE reads keys on the edited model and differs).
        sha = self.final_weights_sha()
        hit = scored.get(sha)
        reused_from, final = hit if hit else (None, self.final())
        eval_s += time.perf_counter() - t0
        curve.append(CurvePoint(step=len(steps), edits=n, general=final.general, drift=final.drift))
        if c.retention_every and final.edit is not None:
            retention.append(RetentionPoint.of(final.edit, edits=n, step=len(steps)))
        setup = dict(editor.setup_seconds)
        if ledger is not None:
            editor.close()
        del editor
        gc.collect()
        step_totals = [s.seconds["total"] for s in steps if s.seconds is not None]
        return ConfigEntry(
            method=method, alignment=alignment, mode=mode, same_as=None,
            values="original (frozen, unedited model)" if frozen else "current (optimised on the edited model)",
            n_steps=len(steps), steps=tuple(steps), final=final, curve=tuple(curve), retention=tuple(retention),
            final_weights_sha256=sha, final_reused_from=reused_from,
            ledger=None if ledger is None else str(ledger), continued_after_step=None if ledger is None else done,
            seconds=ConfigSeconds(setup=setup, edit=edit_s, mean_step=sum(step_totals) / len(step_totals),
                                  evaluation=eval_s, total=time.perf_counter() - t_start + spent_edit + spent_eval),
            status="done",
        )


def _load_model(config: EvalConfig, loaded):
    if loaded is not None:
        return loaded
    from ..models.load import load_model, parse_device_map

    return load_model(config.model, dtype=config.dtype, device_map=parse_device_map(config.device_map))


def adopt_baseline(source: Path, folder: Path, config: EvalConfig, model_info: ModelInfo,
                   selection: Selection) -> tuple[Baseline, References]:
    """The baseline of results folder ``source`` and its references (copied into ``folder``), when it
    was measured on the same model, facts and metrics as ``config`` would measure it (the editing
    settings may differ: format, method, batch size, hyperparameters). Raises
    :class:`EvalSettingsError` naming what differs otherwise."""
    other = read_measured(source, f"--baseline-from {source}")
    mine = ResultsFile(format=FORMAT, model=model_info, settings=Settings.from_dict(config.settings()),
                       selection=SelectionRecord.from_dict(selection.to_dict()))
    if shown := baseline_differences(other, mine):
        raise EvalSettingsError(f"--baseline-from {source}: {shown}")
    refs = References.load(Path(source), config.dataset, config.drift_windows)
    if refs is None:
        raise EvalSettingsError(f"--baseline-from {source}: its pre-edit reference files are missing")
    refs.save(folder)
    assert other.baseline is not None  # read_measured refuses a folder without one
    return replace(other.baseline, adopted_from=str(source)), refs


def config_selection(config: EvalConfig):
    """The facts ``config`` edits (a facts file is parsed once per version: the CLI reads it before the
    model loads, the run reads it back from the cache)."""
    return select_facts(
        config.dataset, config.n, config.seed, layout=config.layout, split=config.resolved_split(),
        zsre_file=config.zsre_file, zsre_target=config.zsre_target, path=config.facts_path,
        unique_slots=config.checkpoint,
    )


def run_eval(config: EvalConfig, out_dir: str | Path, progress: ProgressCallback | None = None, *,
             loaded=None, baseline_from: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) the evaluation ``config`` into ``out_dir``; returns what it wrote to results.json
    (``ResultsFile.to_dict()``, :mod:`seqedit.evaluate.schema`).

    ``baseline_from``: another results folder whose baseline (pre-edit metrics and references) this
    folder adopts instead of measuring it again (:func:`adopt_baseline` checks that it would be the same).
    ``loaded`` is an already loaded model to use instead of loading ``config.model`` (its name and
    base-weight fingerprint are recorded and checked on resume). ``progress`` receives
    :class:`~seqedit.progress.ProgressEvent` s: the editor's phases plus ``CONFIGS``, ``STEPS`` and
    ``STATUS`` messages saying what is running.
    """
    from ..locate.chat import formats
    from ..models.presets import preset_for

    config.validate()
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    settings = config.settings()
    store = ResultsStore(folder, settings)  # a settings clash fails before any slow work
    selection = config_selection(config)
    lm = _load_model(config, loaded)
    try:
        hp = (preset_for(lm.name, lm.adapter.n_layers, config.preset).override(**config.overrides)
              .for_formats(len(formats(config.prompt_format))))
    except (TypeError, ValueError) as e:
        raise EvalSettingsError(f"bad preset or hyperparameter override: {e}") from None
    run = _Run(config, lm, hp, selection, folder, progress)
    model_info = ModelInfo(name=lm.name, cache_key=lm.cache_key, edited_layers_sha256=weights_sha(run.base))
    data = store.results
    if data.model is not None and data.model.to_dict() != model_info.to_dict():
        raise EvalSettingsError(
            f"{folder} holds results for another model or base weights ({data.model.to_dict()} vs "
            f"{model_info.to_dict()}); use another --out folder"
        )
    # the settings record only the overrides: a preset changed under a resumed folder shows here
    if data.hparams is not None and (shown := differences(dict(data.hparams), hp.to_dict())):
        raise EvalSettingsError(
            f"{folder} holds results made with other hyperparameters ({shown}); use another --out folder, or "
            "pass the old values with --set to continue it"
        )
    runs, skipped = plan(config)
    old_requested = data.requested or Requested()
    store.update(
        # how these hparams are spelt today
        settings=replace(data.settings or Settings(), overrides=Settings.from_dict(settings).overrides),
        model=model_info, hparams=hp.to_dict(), selection=SelectionRecord.from_dict(selection.to_dict()),
        versions=Versions.from_dict(library_versions()),
        protocol=Protocol(
            values=config.values, values_description=VALUES_PROTOCOL[config.values],
            evaluation="each configuration starts from the base weights; metrics on the final model after all "
                       "steps (and finalize); curves/retention at intermediate steps are before finalize",
            zsre_target="answers[0] (ROME/MEMIT), alt as the competing answer" if config.zsre_target == "answers"
                        else "alt (EasyEdit), answers[0] as the competing answer",
            zsre_specificity="specificity_vs_pre_edit = agreement with the unedited model's argmax (paper Eq. 39); "
                             "specificity_vs_gold = accuracy on the gold neighbour answer (official code)",
            rte_labels="official inversion (label 1 -> True) reproduced" if config.official_rte_inversion
                       else "GLUE labels (0 = entailment -> True); the official inversion is NOT copied",
            general_scoring=config.general_scoring,
            consistency=CONSISTENCY_UNAVAILABLE,
        ),
        # A folder can grow (methods or modes added by a later run): keep what earlier runs requested.
        requested=Requested(methods=tuple(union_in_order(old_requested.methods, config.methods)),
                            alignments=tuple(union_in_order(old_requested.alignments, config.alignments)),
                            modes=tuple(union_in_order(old_requested.modes, config.modes))),
        planned=tuple(union_in_order(data.planned, [r["label"] for r in runs])),
        skipped=tuple(union_in_order(data.skipped, [Skipped.from_dict(s) for s in skipped])),
    )
    this_run = RunRecord(started=utc_now())
    store.update(runs=(*store.results.runs, this_run))

    def note(**changes: Any) -> None:  # this run's record, the last of the folder's runs
        nonlocal this_run
        this_run = replace(this_run, **changes)
        store.update(runs=(*store.results.runs[:-1], this_run))

    t_run = time.perf_counter()
    try:
        if data.baseline is not None and (refs := References.load(folder, config.dataset, config.drift_windows)):
            run.refs = refs
        elif baseline_from is not None:
            baseline, run.refs = adopt_baseline(Path(baseline_from), folder, config, model_info, selection)
            store.update(baseline=baseline)
        else:
            store.update(baseline=run.baseline())
        store.write()
        emit(progress, ProgressEvent(Phase.CONFIGS, total=len(runs), start=True))
        for r in runs:
            label = r["label"]
            held = store.results.configs.get(label)
            if held is not None and held.status == "done":
                note(resumed=(*this_run.resumed, label))
            elif r["same_as"]:
                store.set_config(label, replace(store.results.configs[r["same_as"]], alignment=r["alignment"],
                                                same_as=r["same_as"], status="done"))
                note(reused=(*this_run.reused, label))
            else:
                partial = held if held is not None and held.status == "running" else None

                def save(entry: ConfigEntry, label: str = label) -> None:
                    store.set_config(label, replace(entry, updated=utc_now()))
                    store.write()

                entry = run.config(r["method"], r["alignment"], r["mode"], scored_finals(store.results.configs),
                                   partial, save)
                store.set_config(label, replace(entry, completed=utc_now()))
                note(ran=(*this_run.ran, label))
                if entry.continued_after_step:
                    note(continued=(*(this_run.continued or ()), label))
            note(wall_seconds=time.perf_counter() - t_run)
            store.write()
            emit(progress, ProgressEvent(Phase.CONFIGS, advance=1, total=len(runs)))
    finally:
        run.restore()
    note(finished=utc_now(), wall_seconds=time.perf_counter() - t_run)
    store.write()
    return store.results.to_dict()
