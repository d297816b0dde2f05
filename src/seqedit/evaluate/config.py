"""What defines an evaluation run, and what it will run: :class:`EvalConfig` and :func:`plan`.

Owns the settings (:class:`EvalConfig`, checked by :meth:`EvalConfig.validate`, raising
:class:`EvalSettingsError`), the choices they range over (:data:`MODES`, :data:`VALUES`,
:data:`SCORINGS`, :data:`VALUES_PROTOCOL`) and the list of configurations a run evaluates
(:func:`plan`). The run itself is :mod:`seqedit.evaluate.runner`; results.json is
:mod:`seqedit.evaluate.results`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import SeqEditError
from ..locate.chat import PROMPT_FORMATS
from ..methods import METHODS, method_info
from ..models.load import parse_device_map, resolve_dtype
from ..models.presets import check_variant, preset_variants
from .general import TASKS
from .selection import DATASETS

__all__ = ["EvalConfig", "EvalSettingsError", "MODES", "SCORINGS", "VALUES", "VALUES_PROTOCOL", "baseline_settings", "plan",
           "union_in_order"]

MODES = {"se": "sequential", "ote": "one_time"}
VALUES = ("original", "current")
SCORINGS = ("likelihood", "generation")


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
    (``layers``, ``lam``, ``v_steps``, ``stats_tokens``, ...). ``checkpoint``: every SE configuration
    edits into a ledger under ``out/ledgers/`` and an interrupted run continues from its last committed
    step; the selection then holds one fact per slot (subject, prompt), since a ledger replaces a
    slot's earlier fact. ``general_every``/``retention_every``/``rekey_every``
    (re-read every fact's keys and re-solve, :mod:`seqedit.rekey`; needs ``checkpoint``) are in steps, 0 = final model only. ``general_n``/``drift_windows``/``fluency_n`` = 0 turn that
    metric off. ``generation_n`` > 0 adds generation efficacy (``evaluate/generation_efficacy.py``) on that
    many facts, spread over the editing order, to every edit measurement. ``fluency_tokens`` is ROME's ``max_out_len`` (tokens per generation, prompt included).
    ``prompt_format`` is the editors' (``bare``, ``chat``, ``both``; ``locate/chat.py``); the edit
    metrics are also measured through the chat template (``evaluate/chat.py``, under ``edit.chat``)
    when it is not ``bare`` or when ``chat_eval`` is set (bare-trained edits asked in chat).
    """

    model: str = "smollm2-135m"
    dataset: str = "counterfact"
    n: int = 100
    batch_size: int = 100
    methods: tuple[str, ...] = ("memit",)
    alignments: tuple[str, ...] = ("aligned",)
    modes: tuple[str, ...] = ("se", "ote")
    values: str = "current"
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
    generation_n: int = 0  # facts (evenly spread) whose greedy generations are scored at each edit measurement
    layout: str = "knowedit"
    split: Optional[str] = "auto"
    zsre_file: str = "mend-eval"
    zsre_target: str = "answers"
    facts_path: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    stats_corpus: Optional[str] = None
    eval_batch_rows: int = 64
    dtype: Optional[str] = None  # the model's dtype (load_model's; None: float32)
    device_map: Optional[str] = None  # load_model's device_map: a device, "auto" or a JSON object
    checkpoint: bool = False
    prompt_format: str = "bare"
    chat_eval: bool = False
    preset: Optional[str] = None  # a named preset variant of the model (None: its default)
    rekey_every: int = 0  # SE steps between rekeys of the ledger (seqedit.rekey); needs checkpoint

    @property
    def chat_metrics(self) -> bool:
        """Whether the edit metrics are also measured through the chat template."""
        return self.chat_eval or self.prompt_format != "bare"

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
        if preset_variants(self.model):  # else the loaded model's own name decides (a path may not say)
            try:
                check_variant(self.model, self.preset)
            except ValueError as e:
                raise EvalSettingsError(f"--preset: {e}") from None
        for m in self.methods:
            need(m in METHODS, f"unknown method {m!r}; expected some of {', '.join(METHODS)}")
        known = {a for m in self.methods for a in METHODS[m]}
        for a in self.alignments:
            need(a in known, f"alignment {a!r} exists for none of the methods {', '.join(self.methods)} "
                             f"(theirs: {', '.join(sorted(known))})")
        need(self.general_scoring in SCORINGS, f"general_scoring must be one of {', '.join(SCORINGS)}")
        for t in self.general_tasks:
            need(t in TASKS, f"unknown general task {t!r}; expected some of {', '.join(TASKS)}")
        need(not self.rekey_every or self.checkpoint,
             "rekey_every re-reads the keys of the facts in a ledger: it needs checkpoint (--checkpoint)")
        for name in ("general_every", "general_n", "retention_every", "drift_windows", "fluency_n", "seed", "rekey_every",
                     "generation_n"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.drift_window >= 2 and self.eval_batch_rows >= 1 and self.fluency_tokens >= 2,
             "drift_window and fluency_tokens must be >= 2 and eval_batch_rows >= 1")
        need(self.layout in ("knowedit", "rome"), f"layout must be knowedit or rome, got {self.layout!r}")
        need(self.zsre_target in ("answers", "alt"), f"zsre_target must be answers or alt, got {self.zsre_target!r}")
        need(self.prompt_format in PROMPT_FORMATS,
             f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        for name, check in (("dtype", resolve_dtype), ("device_map", parse_device_map)):
            try:
                check(getattr(self, name))
            except ValueError as e:
                raise EvalSettingsError(f"{name}: {e}") from None

    def settings(self) -> dict[str, Any]:
        """What fixes the numbers: every field but the configurations requested (those may grow
        between reruns in one folder), with ``split`` resolved. JSON-safe."""
        d = dataclasses.asdict(self)
        for k in ("methods", "alignments", "modes"):
            d.pop(k)
        d["split"] = self.resolved_split()
        for k, default in _ADDED_LATER.items():  # absent from older folders' settings: keep them resumable
            if d[k] == default:
                d.pop(k)
        d["general_tasks"] = list(self.general_tasks)
        d["overrides"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(self.overrides.items())
                          if v is not None}
        return d


# settings that change how facts are edited, not the unedited model's numbers (see baseline_settings)
_EDITING_ONLY = ("batch_size", "values", "general_every", "retention_every", "overrides", "stats_corpus", "checkpoint",
                 "prompt_format", "chat_eval", "preset", "rekey_every")


def baseline_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The part of a folder's ``settings()`` that fixes its baseline (the pre-edit metrics and references):
    the facts, the metrics and the model, not how the facts are edited. Whether the edit metrics are also
    measured through the chat template stays (``chat_metrics``)."""
    full = {**_ADDED_LATER, **settings}
    out = {k: v for k, v in full.items() if k not in _EDITING_ONLY}
    out["chat_metrics"] = bool(full["chat_eval"]) or full["prompt_format"] != "bare"
    return out


# settings fields added after results.json files were written; omitted from settings() at their default
_ADDED_LATER = {"rekey_every": 0, "checkpoint": False, "dtype": None, "device_map": None, "prompt_format": "bare", "chat_eval": False,
                "preset": None, "generation_n": 0}


def union_in_order(old: list, new) -> list:
    """``old`` followed by the items of ``new`` it lacks, in order."""
    return list(old) + [x for x in new if x not in old]


def plan(config: EvalConfig) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The configurations to evaluate, in order, and those skipped with the reason.

    Each entry is ``{"label", "method", "alignment", "mode", "same_as"}``; ``same_as`` names an earlier
    configuration whose numbers are reused because the run would be identical (a form whose
    ``Capabilities.ote_same_as`` names another alignment: one-step naive ≡ aligned MEMIT/AlphaEdit),
    else ``None``.
    """
    runs, skipped, labels = [], [], set()
    for m in dict.fromkeys(config.methods):
        # the registry's order (aligned first), so an OTE naive run can point at the aligned one
        for a in [a for a in METHODS[m] if a in config.alignments]:
            for mode in [x for x in MODES if x in config.modes]:
                label = f"{m}/{a}/{mode}"
                same = None
                twin = method_info(m).form(a).capabilities.ote_same_as
                if mode == "ote" and twin is not None and f"{m}/{twin}/ote" in labels:
                    same = f"{m}/{twin}/ote"
                runs.append({"label": label, "method": m, "alignment": a, "mode": mode, "same_as": same})
                labels.add(label)
        for a in config.alignments:
            if a not in METHODS[m]:
                skipped.append({"config": f"{m}/{a}", "reason": f"{m} has no {a!r} form (it has {', '.join(METHODS[m])})"})
    return runs, skipped
