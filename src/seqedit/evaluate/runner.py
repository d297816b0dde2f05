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
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import hashlib
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..atomic import atomic_write_json
from ..errors import SeqEditError
from ..facts import Fact
from ..methods import METHODS
from .fluency import CONSISTENCY_UNAVAILABLE
from .general import TASKS
from .measure import References, drift_summary, edit_summary, general_summary
from .selection import DATASETS, Selection, select_facts

__all__ = ["EvalConfig", "EvalSettingsError", "FORMAT", "check_out_dir", "plan", "run_eval"]

FORMAT = "seqedit-eval/1"
MODES = {"se": "sequential", "ote": "one_time"}
VALUES = ("original", "current")
SCORINGS = ("likelihood", "generation")
# One step from an empty history: the aligned (accumulated) and naive (fresh) solves coincide
# (REFERENCE_NOTES §2.2/§2.3 and §2.4). prune/rect differ (ridge 1 vs 0), rlsedit has no naive form.
_OTE_SAME_AS_ALIGNED = ("memit", "alphaedit")

Progress = Optional[Callable[[str, int, Optional[int]], None]]


class EvalSettingsError(SeqEditError, ValueError):
    """Bad evaluation settings, or an output folder holding results of other settings."""


VALUES_PROTOCOL = {
    "original": "target values optimised once per fact on the UNEDITED model and shared by every method "
                "and mode (OTE's definition); SE vs OTE then isolates the solver",
    "current": "real SE protocol: each sequential step optimises its target values on the current (edited) "
               "model; OTE uses values from the unedited model by definition",
}


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run (see ``seqedit eval --help`` for each field).

    ``split="auto"`` means CounterFact's ``edit`` split (the ``train`` split was used for tuning) and
    none for ZsRE; ``"all"`` uses every record. ``overrides`` replace preset hyperparameters
    (``layers``, ``lam``, ``v_steps``, ``stats_tokens``, ...). ``general_every``/``retention_every``
    are in steps, 0 = final model only. ``general_n``/``drift_windows``/``fluency_n`` = 0 turn that
    metric off. ``fluency_tokens`` is ROME's ``max_out_len`` (tokens per generation, prompt included).
    """

    model: str = "smollm2-135m"
    dataset: str = "counterfact"
    n: int = 100
    batch_size: int = 100
    methods: tuple[str, ...] = ("memit",)
    alignments: tuple[str, ...] = ("aligned",)
    modes: tuple[str, ...] = ("se", "ote")
    values: str = "original"
    seed: int = 0
    general_every: int = 5
    general_n: int = 100
    general_tasks: tuple[str, ...] = TASKS
    general_scoring: str = "likelihood"
    official_rte_inversion: bool = False
    retention_every: int = 0
    drift_window: int = 256
    drift_windows: int = 32
    fluency_n: int = 50
    fluency_tokens: int = 100
    layout: str = "knowedit"
    split: Optional[str] = "auto"
    zsre_file: str = "mend-eval"
    zsre_target: str = "answers"
    facts_path: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    stats_corpus: Optional[str] = None
    eval_batch_rows: int = 64

    def resolved_split(self) -> Optional[str]:
        if self.split in (None, "all"):
            return None
        if self.split == "auto":
            return "edit" if self.dataset == "counterfact" and self.facts_path is None else None
        return self.split

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise EvalSettingsError(msg)

        need(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; expected one of {', '.join(DATASETS)}")
        need(self.n >= 1 and self.batch_size >= 1, f"n and batch_size must be >= 1, got {self.n}, {self.batch_size}")
        need(self.values in VALUES, f"unknown values protocol {self.values!r}; expected one of {', '.join(VALUES)}")
        need(bool(self.modes) and set(self.modes) <= set(MODES),
             f"modes must be a non-empty subset of {', '.join(MODES)}, got {list(self.modes)}")
        need(bool(self.methods) and bool(self.alignments), "at least one method and one alignment are needed")
        for m in self.methods:
            need(m in METHODS, f"unknown method {m!r}; expected some of {', '.join(METHODS)}")
        known = {a for m in self.methods for a in METHODS[m]}
        for a in self.alignments:
            need(a in known, f"alignment {a!r} exists for none of the methods {', '.join(self.methods)} "
                             f"(theirs: {', '.join(sorted(known))})")
        need(self.general_scoring in SCORINGS, f"general_scoring must be one of {', '.join(SCORINGS)}")
        for t in self.general_tasks:
            need(t in TASKS, f"unknown general task {t!r}; expected some of {', '.join(TASKS)}")
        for name in ("general_every", "general_n", "retention_every", "drift_windows", "fluency_n", "seed"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.drift_window >= 2 and self.eval_batch_rows >= 1 and self.fluency_tokens >= 2,
             "drift_window and fluency_tokens must be >= 2 and eval_batch_rows >= 1")
        need(self.layout in ("knowedit", "rome"), f"layout must be knowedit or rome, got {self.layout!r}")
        need(self.zsre_target in ("answers", "alt"), f"zsre_target must be answers or alt, got {self.zsre_target!r}")

    def settings(self) -> dict[str, Any]:
        """What fixes the numbers: every field but the configurations requested (those may grow
        between reruns in one folder), with ``split`` resolved. JSON-safe."""
        d = dataclasses.asdict(self)
        for k in ("methods", "alignments", "modes"):
            d.pop(k)
        d["split"] = self.resolved_split()
        d["general_tasks"] = list(self.general_tasks)
        d["overrides"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(self.overrides.items())
                          if v is not None}
        return d


def _union(old: list, new) -> list:
    """``old`` followed by the items of ``new`` it lacks, in order."""
    return list(old) + [x for x in new if x not in old]


def plan(config: EvalConfig) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The configurations to evaluate, in order, and those skipped with the reason.

    Each entry is ``{"label", "method", "alignment", "mode", "same_as"}``; ``same_as`` names an earlier
    configuration whose numbers are reused because the run would be identical (OTE naive vs aligned
    for memit/alphaedit), else ``None``.
    """
    runs, skipped, labels = [], [], set()
    for m in dict.fromkeys(config.methods):
        # the registry's order (aligned first), so an OTE naive run can point at the aligned one
        for a in [a for a in METHODS[m] if a in config.alignments]:
            for mode in [x for x in MODES if x in config.modes]:
                label = f"{m}/{a}/{mode}"
                same = None
                if mode == "ote" and a == "naive" and m in _OTE_SAME_AS_ALIGNED and f"{m}/aligned/ote" in labels:
                    same = f"{m}/aligned/ote"
                runs.append({"label": label, "method": m, "alignment": a, "mode": mode, "same_as": same})
                labels.add(label)
        for a in config.alignments:
            if a not in METHODS[m]:
                skipped.append({"config": f"{m}/{a}", "reason": f"{m} has no {a!r} form (it has {', '.join(METHODS[m])})"})
    return runs, skipped


def _versions() -> dict[str, Any]:
    import numpy
    import transformers

    from .. import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "seqedit": __version__, "git_commit": commit, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
    }


def _weights_sha(base: dict[int, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for layer in sorted(base):
        h.update(str(layer).encode())
        h.update(base[layer].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _scored_finals(configs: dict[str, dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{final_weights_sha256: (label, final metrics)}`` of the done configurations that scored their
    own final model (the first such one per sha)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for label, c in configs.items():
        if c.get("status") == "done" and c.get("final_weights_sha256") and not c.get("final_reused_from"):
            out.setdefault(c["final_weights_sha256"], (label, c["final"]))
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class _Store:
    """``results.json`` under ``folder``: loaded if present (settings must match), rewritten atomically."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        self.path = folder / "results.json"
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text("utf-8"))
            except json.JSONDecodeError as e:
                raise EvalSettingsError(f"{self.path} is not valid JSON ({e}); move it away to start afresh") from None
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise EvalSettingsError(f"{self.path} is not a {FORMAT} results file; use another output folder")
            old = data.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                shown = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:6])
                raise EvalSettingsError(
                    f"{folder} holds results of other settings ({shown}); use another --out folder "
                    "(results of different settings are never mixed)"
                )
            self.data = data
        else:
            self.data = {"format": FORMAT, "settings": settings, "configs": {}, "runs": []}

    def write(self) -> None:
        atomic_write_json(self.path, self.data)


def _step_dict(report) -> dict[str, Any]:
    d = report.to_dict()
    d.pop("fact_ids", None)  # the selection's order already names them
    return d


class _Run:
    """State shared by the configurations of one ``run_eval`` call."""

    def __init__(self, config: EvalConfig, loaded, hp, selection: Selection, folder: Path, progress: Progress):
        self.cfg, self.lm, self.hp, self.sel, self.folder, self.progress = config, loaded, hp, selection, folder, progress
        self.facts: list[Fact] = selection.facts
        self.base = {l: loaded.adapter.weight(l).detach().clone() for l in hp.layers}
        self.refs: References | None = None
        self._targets = None

    def say(self, what: str) -> None:
        if self.progress:
            self.progress(f"status:{what}", 0, None)

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
            cb = (lambda k: self.progress("values", k, len(self.facts))) if self.progress else None
            self._targets = frozen_targets(self.lm, self.facts, templates, hp, progress=cb)
        return self._targets

    # ---------------------------------------------------------------- measurements
    def edit(self, facts: list[Fact]) -> dict[str, Any]:
        self.say(f"{self.cfg.dataset} metrics on {len(facts)} facts")
        return edit_summary(self.lm, self.cfg.dataset, facts, self.refs, self.cfg.eval_batch_rows)

    def capability(self) -> dict[str, Any]:
        c = self.cfg
        self.say("general capability")
        gen = general_summary(self.lm, c.general_tasks, c.general_n, c.general_scoring, c.official_rte_inversion,
                              c.eval_batch_rows)
        self.say("WikiText-2 drift")
        return {"general": gen, "drift": drift_summary(self.lm, self.refs)}

    def fluency(self) -> dict[str, Any] | None:
        if self.cfg.dataset != "counterfact" or self.cfg.fluency_n == 0:
            return None
        from .cf_fluency import counterfact_fluency

        self.say("fluency (sampling generations)")
        t = time.perf_counter()
        out = counterfact_fluency(self.lm, self.facts, self.cfg.fluency_n, seed=self.cfg.seed,
                                  max_total_tokens=self.cfg.fluency_tokens,
                                  batch_rows=max(1, self.cfg.eval_batch_rows // 2))
        return {**out, "seconds": time.perf_counter() - t}

    def final(self) -> dict[str, Any]:
        return {"edit": self.edit(self.facts), **self.capability(), "fluency": self.fluency()}

    # ---------------------------------------------------------------- runs
    def baseline(self) -> dict[str, Any]:
        self.restore()
        t = time.perf_counter()
        self.say("pre-edit references")
        c = self.cfg
        self.refs = References.compute(self.lm, c.dataset, self.facts, c.drift_window, c.drift_windows,
                                       c.eval_batch_rows)
        self.refs.save(self.folder)
        out = self.final()
        out["seconds"] = time.perf_counter() - t
        return out

    def final_weights_sha(self) -> str:
        return _weights_sha({l: self.lm.adapter.weight(l) for l in self.hp.layers})

    def config(self, method: str, alignment: str, mode: str,
               scored: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """Run one configuration. ``scored`` maps the final-weights sha256 of configurations already
        scored to ``(label, final metrics)`` (see :func:`_scored_finals`)."""
        from ..editor import Editor

        c, n = self.cfg, len(self.facts)
        frozen = c.values == "original" or mode == "ote"
        targets = self.targets() if frozen else None
        self.restore()
        t_start = time.perf_counter()
        editor = Editor(self.lm, method=method, mode=MODES[mode], alignment=alignment, hparams=self.hp,
                        stats_corpus=c.stats_corpus)
        bounds = [(0, n)] if mode == "ote" else [(lo, min(lo + c.batch_size, n)) for lo in range(0, n, c.batch_size)]
        steps, curve, retention = [], [], []
        edit_s = eval_s = 0.0
        for t, (lo, hi) in enumerate(bounds, start=1):
            self.say(f"step {t}/{len(bounds)}")
            t0 = time.perf_counter()
            report = editor.apply(self.facts[lo:hi], self.progress,
                                  values=targets.value_result(lo, hi) if frozen else None)
            edit_s += time.perf_counter() - t0
            steps.append(_step_dict(report))
            if self.progress:
                self.progress("steps", 1, len(bounds))
            t0 = time.perf_counter()
            if t < len(bounds) and c.general_every and t % c.general_every == 0:
                curve.append({"step": t, "edits": hi, **self.capability()})
            if t < len(bounds) and c.retention_every and t % c.retention_every == 0:
                retention.append({"step": t, "edits": hi, **self.edit(self.facts[:hi])})
            eval_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        editor.finalize()
        edit_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        # Bit-identical weights give bit-identical scores, so such a final model is scored once (e.g. a
        # one-step SE and its OTE; over several steps SE reads keys on the edited model and differs).
        sha = self.final_weights_sha()
        hit = scored.get(sha)
        reused_from, final = hit if hit else (None, self.final())
        eval_s += time.perf_counter() - t0
        curve.append({"step": len(bounds), "edits": n, "general": final["general"], "drift": final["drift"]})
        if c.retention_every:
            retention.append({"step": len(bounds), "edits": n, **final["edit"]})
        setup = dict(editor.setup_seconds)
        del editor
        gc.collect()
        step_totals = [s["seconds"]["total"] for s in steps]
        return {
            "method": method, "alignment": alignment, "mode": mode, "same_as": None,
            "values": "original (frozen, unedited model)" if frozen else "current (optimised on the edited model)",
            "n_steps": len(bounds), "steps": steps, "final": final, "curve": curve, "retention": retention,
            "final_weights_sha256": sha, "final_reused_from": reused_from,
            "seconds": {"setup": setup, "edit": edit_s, "mean_step": sum(step_totals) / len(step_totals),
                        "evaluation": eval_s, "total": time.perf_counter() - t_start},
        }


def check_out_dir(config: EvalConfig, out_dir: str | Path) -> None:
    """Raise :class:`EvalSettingsError` if ``config`` is invalid or ``out_dir`` holds other settings' results."""
    config.validate()
    _Store(Path(out_dir), config.settings())


def _load_model(config: EvalConfig, loaded):
    if loaded is not None:
        return loaded
    from ..models.load import load_model

    return load_model(config.model)


def run_eval(config: EvalConfig, out_dir: str | Path, progress: Progress = None, *, loaded=None) -> dict[str, Any]:
    """Run (or resume) the evaluation ``config`` into ``out_dir``; returns the results dict.

    ``loaded`` is an already loaded model to use instead of loading ``config.model`` (its name and
    base-weight fingerprint are recorded and checked on resume). ``progress(phase, advance, total)``
    gets the editor's phases plus ``configs``, ``steps`` and ``status:<what is running>``.
    """
    from ..models.presets import preset_for

    config.validate()
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    store = _Store(folder, config.settings())  # a settings clash fails before any slow work
    selection = select_facts(
        config.dataset, config.n, config.seed, layout=config.layout, split=config.resolved_split(),
        zsre_file=config.zsre_file, zsre_target=config.zsre_target, path=config.facts_path,
    )
    lm = _load_model(config, loaded)
    try:
        hp = preset_for(lm.name, lm.adapter.n_layers).override(**config.overrides)
    except (TypeError, ValueError) as e:
        raise EvalSettingsError(f"bad hyperparameter override: {e}") from None
    run = _Run(config, lm, hp, selection, folder, progress)
    model_info = {"name": lm.name, "cache_key": lm.cache_key, "edited_layers_sha256": _weights_sha(run.base)}
    data = store.data
    if "model" in data and data["model"] != model_info:
        raise EvalSettingsError(
            f"{folder} holds results for another model or base weights ({data['model']} vs {model_info}); "
            "use another --out folder"
        )
    runs, skipped = plan(config)
    data.update({
        "model": model_info, "hparams": hp.to_dict(), "selection": selection.to_dict(), "versions": _versions(),
        "protocol": {
            "values": config.values, "values_description": VALUES_PROTOCOL[config.values],
            "evaluation": "each configuration starts from the base weights; metrics on the final model after all "
                          "steps (and finalize); curves/retention at intermediate steps are before finalize",
            "zsre_target": "answers[0] (ROME/MEMIT), alt as the competing answer" if config.zsre_target == "answers"
                           else "alt (EasyEdit), answers[0] as the competing answer",
            "zsre_specificity": "specificity_vs_pre_edit = agreement with the unedited model's argmax (paper Eq. 39); "
                                "specificity_vs_gold = accuracy on the gold neighbour answer (official code)",
            "rte_labels": "official inversion (label 1 -> True) reproduced" if config.official_rte_inversion
                          else "GLUE labels (0 = entailment -> True); the official inversion is NOT copied",
            "general_scoring": config.general_scoring,
            "consistency": CONSISTENCY_UNAVAILABLE,
        },
    })
    data.setdefault("configs", {})
    # A folder can grow (methods or modes added by a later run): keep what earlier runs requested.
    asked = {"methods": config.methods, "alignments": config.alignments, "modes": config.modes}
    data["requested"] = {k: _union(data.get("requested", {}).get(k, []), v) for k, v in asked.items()}
    data["planned"] = _union(data.get("planned", []), [r["label"] for r in runs])
    data["skipped"] = _union(data.get("skipped", []), skipped)
    this_run = {"started": _now(), "finished": None, "ran": [], "resumed": [], "reused": []}
    data.setdefault("runs", []).append(this_run)
    t_run = time.perf_counter()
    try:
        if "baseline" in data and (refs := References.load(folder, config.dataset, config.drift_windows)):
            run.refs = refs
        else:
            data["baseline"] = run.baseline()
        store.write()
        for r in runs:
            label = r["label"]
            if data["configs"].get(label, {}).get("status") == "done":
                this_run["resumed"].append(label)
            elif r["same_as"]:
                data["configs"][label] = {**data["configs"][r["same_as"]], "alignment": r["alignment"],
                                          "same_as": r["same_as"], "status": "done"}
                this_run["reused"].append(label)
            else:
                entry = run.config(r["method"], r["alignment"], r["mode"], _scored_finals(data["configs"]))
                data["configs"][label] = {**entry, "status": "done", "completed": _now()}
                this_run["ran"].append(label)
            this_run["wall_seconds"] = time.perf_counter() - t_run
            store.write()
            if progress:
                progress("configs", 1, len(runs))
    finally:
        run.restore()
    this_run["finished"] = _now()
    this_run["wall_seconds"] = time.perf_counter() - t_run
    store.write()
    return data
