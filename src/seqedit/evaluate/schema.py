"""The typed schema of ``results.json`` (format ``seqedit-eval/1``), shared by its writer and readers.

The runner builds these objects (through :class:`.results.ResultsStore`) and writes their
``to_dict()``; the report, :mod:`.compare` and the benchmark scripts read a file with
:func:`read_results` and use attributes. Each class is a frozen :class:`~.record.Record` whose fields
are the JSON keys of that object (:mod:`.record`: validation, exact round trip, unknown keys kept).

Units: edit metrics, accuracies, F1 and top-1 agreement are fractions in [0, 1]; MCC and
``*_gm_prob_*`` (mean probability margins) are in [-1, 1]; perplexity is exp(mean NLL, nats per
token); norms are Frobenius norms; ``seconds`` are wall-clock seconds; times are UTC ISO 8601.

Required are the keys that identify a record (the format, a configuration's ``status``, a point's
``edits``, a cohort's ``facts``, a skip, a run's ``started``, a source's folder, a model's ``name``).
Every measured value is optional (``None``): older files, runs still going and metrics turned off
lack them, and a reader shows a missing value as missing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .record import Record, ResultsFileError, many, opt, table

__all__ = ["Baseline", "ChatMetrics", "Cohort", "ConfigEntry", "ConfigSeconds", "CurvePoint", "DriftSummary",
           "EditMetrics", "FinalMetrics", "FluencySummary", "GeneralSummary", "GenerationMetrics", "ModelInfo",
           "Protocol", "Record", "Requested", "ResultsFile", "ResultsFileError", "RetentionPoint", "RunRecord",
           "SelectionRecord", "Settings", "Skipped", "Source", "StepRecord", "TaskScore", "Versions", "read_results"]

@dataclass(frozen=True, kw_only=True)
class ChatMetrics(Record):
    """The edit metrics asked through the chat template (:mod:`.chat`); ``answer_new`` / ``answer_true``:
    the share of greedy replies whose first sentence names the new / the true target."""

    efficacy: float | None = opt()
    generalization: float | None = opt()
    specificity: float | None = opt()
    answer_new: float | None = opt()
    answer_true: float | None = opt()
    n_records: int | None = opt()
    seconds: float | None = opt()


@dataclass(frozen=True, kw_only=True)
class Cohort(Record):
    """Means over a block of facts in editing order (``facts = (first, last)``, 1-based, inclusive)."""

    facts: tuple[int, ...]
    efficacy: float | None = opt(null=True)
    generalization: float | None = opt(null=True)
    specificity: float | None = opt(null=True)
    specificity_vs_gold: float | None = opt(null=True)
    specificity_vs_pre_edit: float | None = opt(null=True)


@dataclass(frozen=True, kw_only=True)
class GenerationMetrics(Record):
    """Greedy generations that begin with the target (:mod:`.generation_efficacy`), fractions in [0, 1]."""

    generation_efficacy: float | None = opt(null=True)
    generation_generalization: float | None = opt(null=True)
    n_records: int | None = opt()


@dataclass(frozen=True, kw_only=True)
class EditMetrics(Record):
    """CounterFact (``specificity``, ``*_gm_prob_*``) or ZsRE (``specificity_vs_*``) means over the facts
    edited so far; ``chat``, ``by_cohort`` and ``generation`` where those measurements were on."""

    efficacy: float | None = opt(null=True)
    generalization: float | None = opt(null=True)
    specificity: float | None = opt(null=True)
    specificity_vs_pre_edit: float | None = opt(null=True)
    specificity_vs_gold: float | None = opt(null=True)
    rewrite_gm_prob_new_minus_true: float | None = opt(null=True)
    paraphrase_gm_prob_new_minus_true: float | None = opt(null=True)
    neighborhood_gm_prob_new_minus_answer: float | None = opt(null=True)
    n_skipped: int | None = opt()
    n_records: int | None = opt()
    by_cohort: tuple[Cohort, ...] | None = opt()
    chat: ChatMetrics | None = opt()
    generation: GenerationMetrics | None = opt()
    seconds: float | None = opt()
    records_per_second: float | None = opt(null=True)


@dataclass(frozen=True, kw_only=True)
class TaskScore(Record):
    """One general task: accuracy, weighted F1 and MCC (in [-1, 1]) over ``n`` items."""

    accuracy: float | None = opt()
    f1: float | None = opt()
    mcc: float | None = opt()
    n: int | None = opt()


@dataclass(frozen=True, kw_only=True)
class GeneralSummary(Record):
    """The general-capability tasks (``likelihood`` or ``generation`` scoring) and their means."""

    scoring: str | None = opt()
    tasks: Mapping[str, TaskScore] = table()
    mean_accuracy: float | None = opt()
    mean_f1: float | None = opt()
    mean_mcc: float | None = opt()
    seconds: float | None = opt()


@dataclass(frozen=True, kw_only=True)
class DriftSummary(Record):
    """WikiText-2 test perplexity (``None`` if not finite), mean NLL and top-1 agreement with the unedited model."""

    ppl: float | None = opt(null=True)
    mean_nll: float | None = opt()
    agreement: float | None = opt()
    n_tokens: int | None = opt()
    seconds: float | None = opt()


@dataclass(frozen=True, kw_only=True)
class FluencySummary(Record):
    """CounterFact fluency: mean n-gram entropy of ``n_texts`` sampled texts (``consistency``: see the note)."""

    fluency: float | None = opt(null=True)
    consistency: float | None = opt(null=True)
    consistency_note: str | None = opt()
    n_records: int | None = opt()
    n_texts: int | None = opt()
    n_without_prompts: int | None = opt()
    seconds: float | None = opt()


@dataclass(frozen=True, kw_only=True)
class FinalMetrics(Record):
    """Every metric of one model: the edit metrics of all selected facts, general, drift, fluency (or ``None``)."""

    edit: EditMetrics | None = opt()
    general: GeneralSummary | None = opt(null=True)
    drift: DriftSummary | None = opt(null=True)
    fluency: FluencySummary | None = opt(null=True)


@dataclass(frozen=True, kw_only=True)
class Baseline(FinalMetrics):
    """The unedited model's metrics; ``adopted_from`` the folder they were copied from (``--baseline-from``)."""

    seconds: float | None = opt()
    adopted_from: str | None = opt()


@dataclass(frozen=True, kw_only=True)
class CurvePoint(Record):
    """General capability and drift after ``step`` steps, ``edits`` facts edited."""

    step: int | None = opt()
    edits: int
    general: GeneralSummary | None = opt(null=True)
    drift: DriftSummary | None = opt(null=True)


@dataclass(frozen=True, kw_only=True)
class RetentionPoint(EditMetrics):
    """The edit metrics of the ``edits`` facts edited so far, after ``step`` steps (no ``step`` for the
    final model's point a joined comparison adds)."""

    step: int | None = opt()
    edits: int

    @classmethod
    def of(cls, metrics: EditMetrics, edits: int, step: int | None = None) -> RetentionPoint:
        """``metrics`` as the point at ``edits`` facts (its keys spelt as they were)."""
        return metrics.recast(cls, step=step, edits=edits)


@dataclass(frozen=True, kw_only=True)
class StepRecord(Record):
    """One step (``StepReport.to_dict()`` less the fact ids): per-phase ``seconds``; per layer (as strings)
    ``residual_norms`` ‖Z − H‖, ``update_norms`` ‖Δ‖, ``drift_norms`` ‖W − W₀‖; ids it ``removed``.
    All optional: a copy journaled by an older ledger may lack any."""

    id: int | None = opt()
    method: str | None = opt()
    n_facts: int | None = opt()
    seconds: Mapping[str, float] | None = opt()
    residual_norms: Mapping[str, float | None] | None = opt()
    final_residual: float | None = opt(null=True)
    target_norm: float | None = opt(null=True)
    mean_value_steps: float | None = opt()
    update_norms: Mapping[str, float | None] | None = opt()
    drift_norms: Mapping[str, float | None] | None = opt()
    value_work: Mapping[str, float | None] | None = opt()
    removed: tuple[str, ...] | None = opt()


@dataclass(frozen=True, kw_only=True)
class ConfigSeconds(Record):
    """A configuration's seconds: ``setup`` per phase (Σ₀, factorisation), edit, mean step, evaluation, total."""

    setup: Mapping[str, float] | None = opt()
    edit: float | None = opt()
    mean_step: float | None = opt()
    evaluation: float | None = opt()
    total: float | None = opt()


@dataclass(frozen=True, kw_only=True)
class ConfigEntry(Record):
    """One configuration, ``done`` (with ``final``) or ``running`` (checkpointed: ``edited`` so far);
    ``same_as``: the identical run whose numbers it reuses; ``final_reused_from``: the one whose final
    weights were bit-identical; ``joined_from``: the folders a joined comparison took points from."""

    @classmethod
    def running(cls, **fields: Any) -> ConfigEntry:
        """A checkpointed configuration's entry so far: without the keys of a finished one."""
        return cls(**fields, status="running", _flip=frozenset({"same_as", "final_reused_from"}))

    method: str | None = opt()
    alignment: str | None = opt()
    mode: str | None = opt()
    same_as: str | None = opt(null=True)
    values: str | None = opt()
    n_steps: int | None = opt()
    steps: tuple[StepRecord, ...] = many()
    final: FinalMetrics | None = opt()
    curve: tuple[CurvePoint, ...] = many()
    retention: tuple[RetentionPoint, ...] = many()
    edited: int | None = opt()
    final_weights_sha256: str | None = opt()
    final_reused_from: str | None = opt(null=True)
    ledger: str | None = opt()
    continued_after_step: int | None = opt()
    seconds_so_far: ConfigSeconds | None = opt()
    seconds: ConfigSeconds | None = opt()
    status: str
    updated: str | None = opt()
    completed: str | None = opt()
    joined_from: tuple[str, ...] | None = opt()


@dataclass(frozen=True, kw_only=True)
class Settings(Record):
    """``EvalConfig.settings()``: what fixes the numbers (fields added later are absent at their default)."""

    model: str | None = opt()
    dataset: str | None = opt()
    n: int | None = opt()
    batch_size: int | None = opt()
    values: str | None = opt()
    seed: int | None = opt()
    general_every: int | None = opt()
    general_n: int | None = opt()
    general_tasks: tuple[str, ...] | None = opt()
    general_scoring: str | None = opt()
    official_rte_inversion: bool | None = opt()
    retention_every: int | None = opt()
    drift_window: int | None = opt()
    drift_windows: int | None = opt()
    fluency_n: int | None = opt()
    fluency_tokens: int | None = opt()
    generation_n: int | None = opt()
    layout: str | None = opt()
    split: str | None = opt(null=True)
    zsre_file: str | None = opt()
    zsre_target: str | None = opt()
    facts_path: str | None = opt(null=True)
    overrides: Mapping[str, Any] | None = opt()
    stats_corpus: str | None = opt(null=True)
    eval_batch_rows: int | None = opt()
    dtype: str | None = opt(null=True)
    device_map: str | None = opt(null=True)
    checkpoint: bool | None = opt()
    prompt_format: str | None = opt()
    chat_eval: bool | None = opt()
    preset: str | None = opt(null=True)
    rekey_every: int | None = opt()


@dataclass(frozen=True, kw_only=True)
class ModelInfo(Record):
    """The model: its name, base-weight cache key and the sha256 of its edited layers' base weights."""

    name: str
    cache_key: str | None = opt(null=True)
    edited_layers_sha256: str | None = opt()


@dataclass(frozen=True, kw_only=True)
class SelectionRecord(Record):
    """The facts edited (``Selection.to_dict()``): their ids in editing order and how they were drawn."""

    source: str | None = opt()
    n_available: int | None = opt()
    n: int | None = opt()
    seed: int | None = opt()
    method: str | None = opt()
    fact_ids: tuple[str, ...] | None = opt()
    skipped_same_slot: tuple[str, ...] | None = opt()


@dataclass(frozen=True, kw_only=True)
class Versions(Record):
    """The software that wrote the file (``library_versions()``)."""

    seqedit: str | None = opt()
    git_commit: str | None = opt(null=True)
    python: str | None = opt()
    torch: str | None = opt()
    transformers: str | None = opt()
    numpy: str | None = opt()
    torch_threads: int | None = opt()
    platform: str | None = opt()


@dataclass(frozen=True, kw_only=True)
class Protocol(Record):
    """The protocol in words, for the report (``values`` is the values protocol, or ``mixed`` in a comparison)."""

    values: str | None = opt()
    values_description: str | None = opt()
    evaluation: str | None = opt()
    zsre_target: str | None = opt()
    zsre_specificity: str | None = opt()
    rte_labels: str | None = opt()
    general_scoring: str | None = opt()
    consistency: str | None = opt()


@dataclass(frozen=True, kw_only=True)
class Requested(Record):
    """Every method, alignment and mode any run into the folder asked for, in order."""

    methods: tuple[str, ...] = many()
    alignments: tuple[str, ...] = many()
    modes: tuple[str, ...] = many()


@dataclass(frozen=True, kw_only=True)
class Skipped(Record):
    """A requested ``method/alignment`` that does not exist, and why."""

    config: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RunRecord(Record):
    """One ``run_eval`` call into the folder (UTC ISO times; ``finished`` null while it runs or after it died)."""

    started: str
    finished: str | None = opt(null=True)
    ran: tuple[str, ...] = many()
    resumed: tuple[str, ...] = many()
    reused: tuple[str, ...] = many()
    continued: tuple[str, ...] | None = opt()
    wall_seconds: float | None = opt()


@dataclass(frozen=True, kw_only=True)
class Source(Record):
    """One folder of a comparison: its configurations (as labelled in it) and how it ran them;
    ``hparams_vs_first`` maps a hyperparameter to ``[value in the first folder, value here]``."""

    folder: str
    configs: tuple[str, ...]
    values: str | None = opt(null=True)
    prompt_format: str | None = opt(null=True)
    preset: str | None = opt(null=True)
    batch_size: int | None = opt(null=True)
    commit: str | None = opt(null=True)
    hparams_vs_first: Mapping[str, Any] = table()


@dataclass(frozen=True, kw_only=True)
class ResultsFile(Record):
    """A whole results.json: settings and what they resolved to, the configurations by label
    (``method/alignment/mode``, in run order), the runs, the baseline; ``sources`` in a comparison."""

    format: str
    settings: Settings | None = opt()
    configs: Mapping[str, ConfigEntry] = table()
    runs: tuple[RunRecord, ...] = many()
    model: ModelInfo | None = opt()
    hparams: Mapping[str, Any] | None = opt()
    selection: SelectionRecord | None = opt()
    versions: Versions | None = opt()
    protocol: Protocol | None = opt()
    requested: Requested | None = opt()
    planned: tuple[str, ...] = many()
    skipped: tuple[Skipped, ...] = many()
    baseline: Baseline | None = opt()
    sources: tuple[Source, ...] | None = opt()


def read_results(path: str | Path) -> ResultsFile:
    """The results.json at ``path``, validated (``OSError`` and ``json.JSONDecodeError`` pass through)."""
    path = Path(path)
    return ResultsFile.from_dict(json.loads(path.read_text("utf-8")), source=path)
