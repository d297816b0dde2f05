"""The editor: locate → solve → apply steps whose sum equals the one-time solution.

An :class:`Editor` is a :class:`~seqedit.bank.LayerBank` (per edited layer: the method state, W₀, the
float64 master, Σ₀) on a model, plus an optional :class:`~seqedit.ledger.LedgerSession` that makes every
step durable. A step on n facts:

1. optimise target values ``z`` at the z-layer (batched, on the current model);
2. for each edited layer in ascending order: read keys ``K_i`` and the z-layer state ``H_i`` on the
   current model, take the residual share ``R_i = (Z − H_i) / (L − i)``, let the bank solve
   ``Δ_i = R_i (A_new⁻¹ K_i)ᵀ`` and write it before the next layer reads its keys.

With keys and values held fixed, the sum of the steps' Δ equals the one-time update of all facts
(``apply_kv`` exposes that identity; see ``tests/unit/test_editor.py`` and ``tests/integration/test_exactness.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Iterable, Protocol, Sequence

import torch

from .bank import LayerBank
from .editor_ledger import LedgerOperations
from .facts import Fact
from .guards import (check_batch, check_editor_args, check_fit, check_lam_growth, check_reopen, editor_options,
                     ledger_settings)
from .ledger.manifest import recorded_base, reconcile
from .ledger.plan import Plan
from .ledger.store import Ledger, StepRecord
from .locate.chat import check_chat_template, formats
from .locate.stats import layer_stats
from .locate.templates import context_templates
from .locate.values import ValueResult
from .methods import parse_method
from .models.load import LoadedModel, as_loaded, load_model
from .models.presets import EditHParams, preset_for
from .pending import EditorLedger
from .pipeline import edit_step
from .step_engine import solve_layers
from .progress import Phase, ProgressCallback, ProgressEvent, counter, emit
from .rekey import check_exact, rekey_due
from .shared_data import wikitext_path
from .steps import EditorCallback, RunPosition, StepReport

__all__ = ["DEFAULT_METHOD", "Editor", "MODES", "StepReport", "ValueSource"]

MODES = ("sequential", "one_time")
DEFAULT_METHOD = "memit"


class ValueSource(Protocol):
    """Target values computed beforehand for a fact list, sliced per step (``FrozenTargets`` is one)."""

    def value_result(self, lo: int = 0, hi: int | None = None) -> ValueResult: ...


class Editor(LedgerOperations):
    """Edits facts into a model, keeping the exact normal-equation state of each edited layer.

    ``Editor(model, tokenizer=None, method="memit", mode="sequential")`` with ``model`` a
    :class:`LoadedModel`, a name for :func:`~seqedit.load_model`, or a Hugging Face causal LM (then
    ``tokenizer`` is required). ``hparams`` defaults to the model's preset, or to its named variant
    ``preset`` (:func:`~seqedit.models.presets.preset_variants`: ``"public-json"``, ``"one-step"``, ...);
    keyword ``overrides`` replace
    single fields (``layers=(3, 4)``, ``lam=1e4``, ...) or set options of the method form
    (``ridge=0.5``; or ``method_options={...}``). ``stats_corpus`` is the text file Σ₀ is estimated on
    (default: WikiText-2 valid from the shared data). ``callbacks``: objects with ``on_step_end(editor,
    report, position)`` (:class:`~seqedit.steps.EditorCallback`).

    ``ledger="dir/"`` makes the editor durable (``docs/ledger.md``): a new directory records the
    base model, method and hyperparameters; an existing one is reopened (its method and
    hyperparameters are used unless given, and must then agree) and the model's edited layers are
    restored to the last committed step. With a ledger a fact whose slot is in force is replaced,
    and ``forget``, ``undo``, ``verify``, ``export`` are available. ``kv_dtype`` (``"float64"`` or
    ``"float32"``) is the storage precision of per-fact keys/values of a new ledger; the solve uses
    the stored values, so a reopened ledger reproduces the live weights. ``snapshot_every``: steps
    between snapshots of the per-layer state (reopen replays at most that many steps).
    :meth:`from_ledger` reopens a ledger on its recorded base model and dtype; the operations that need a
    ledger are :class:`~seqedit.editor_ledger.LedgerOperations`.

    ``prompt_format`` (``"bare"``, ``"chat"`` or ``"both"``, ``locate/chat.py``) is how each fact is
    written for its keys and values: as a bare completion, as a question through the tokenizer's chat
    template with the answer starting the assistant's turn, or both (one key column per format, or one
    averaged key with ``format_columns=False``; ``docs/chat.md``). A ledger records it and
    every step's; continuing a ledger in another format is refused unless ``mix_prompt_formats=True``.
    Default: the ledger's, else ``"bare"``.

    ``solve_device`` is where each edited layer's float64 state lives and is solved (``LayerBank``):
    by default the layer's GPU when it has one, else the CPU; ``"cpu"`` saves ~2·d_in²·8 bytes of GPU
    memory per layer (``docs/architecture.md``, "Devices and dtypes").
    """

    def __init__(
        self,
        model: LoadedModel | str | Any,
        tokenizer: Any = None,
        *,
        method: str | None = None,
        mode: str = "sequential",
        alignment: str | None = None,
        method_options: dict | None = None,
        hparams: EditHParams | None = None,
        preset: str | None = None,
        stats_corpus: str | None = None,
        ledger: str | os.PathLike | None = None,
        kv_dtype: str = "float64",
        snapshot_every: int = 10,
        callbacks: Sequence[EditorCallback] = (),
        solve_device: torch.device | str | None = None,
        prompt_format: str | None = None,
        mix_prompt_formats: bool = False,
        **overrides: Any,
    ):
        check_editor_args(MODES, mode, prompt_format, ledger)
        self.loaded = as_loaded(model, tokenizer)
        if preset is not None:  # a named preset variant is a way to spell ``hparams``
            if hparams is not None:
                raise ValueError("give hparams= or preset=, not both")
            hparams = preset_for(self.loaded.name, self.loaded.adapter.n_layers, preset)
        options, overrides = editor_options(method_options, overrides)
        self._lh = lh = EditorLedger()
        if ledger is not None and Ledger.exists(ledger):
            lh.ledger = Ledger.open_for_writing(ledger)
            man = lh.ledger.manifest
            try:
                agreed = ledger_settings(man, ledger, method=method, alignment=alignment, options=options,
                                         hparams=hparams, overrides=overrides, prompt_format=prompt_format,
                                         mix_prompt_formats=mix_prompt_formats)
                self.spec, self.hparams = reconcile(man, self.loaded, agreed.requested, hparams, overrides, ledger)
                prompt_format = agreed.prompt_format
                check_chat_template(self.loaded.tokenizer, prompt_format)
            except BaseException:
                lh.ledger.close()
                raise
            kv_dtype, snapshot_every = man["kv_dtype"], man["snapshot_every"]
        else:
            self.hparams = (hparams or preset_for(self.loaded.name, self.loaded.adapter.n_layers)).override(**overrides)
            self.spec = parse_method(method or DEFAULT_METHOD, alignment, **options)
            check_chat_template(self.loaded.tokenizer, prompt_format or "bare")
        self.method, self.mode = self.spec.name, mode
        self.prompt_format: str = prompt_format or "bare"
        self.hparams = self.hparams.for_formats(len(formats(self.prompt_format)))
        n_layers = self.loaded.adapter.n_layers
        for layer in self.hparams.layers:
            if not 0 <= layer < n_layers:
                raise ValueError(f"edited layer {layer} does not exist: the model has {n_layers} layers")
        self.stats_corpus = stats_corpus
        self.callbacks = list(callbacks)
        check_lam_growth(self.hparams, self.spec)
        self.bank = LayerBank(self.loaded.adapter, self.spec, self.hparams.layers, self.hparams.lam,
                              keep_sigma0=ledger is not None or bool(self.hparams.lam_growth), solve_device=solve_device)
        self._facts_solved = 0  # ledger-free: facts solved so far (all in force), which λ's schedule reads
        lh.lam_for = self.hparams.lam_for if self.hparams.lam_growth else None
        self.steps: list[StepReport] = []
        self.setup_seconds: dict[str, float] = {}
        self.last_record: StepRecord | None = None
        self._templates: list[str] | None = None
        self._finalized = False
        if ledger is not None:
            self._open_ledger(ledger, kv_dtype, snapshot_every)

    @classmethod
    def from_ledger(cls, path: str | os.PathLike, *, model: str | None = None, dtype: Any = None,
                    device_map: Any = None, **kwargs: Any) -> Editor:
        """Reopen the ledger at ``path`` on a freshly loaded base model: ``model`` (a name or directory;
        default the name the ledger records) in ``dtype`` (default the dtype the ledger records, which
        its base fingerprint includes) placed by ``device_map`` (:func:`~seqedit.load_model`).
        ``kwargs`` go to the constructor (``solve_device``, ``callbacks``, ...). What the ledger would
        refuse (its lock taken, another method, options or objective) is refused before the model loads."""
        check_reopen(path, MODES, kwargs)
        base = recorded_base(path)
        lm = load_model(model or base["name"], dtype=dtype or base.get("dtype"), device_map=device_map)
        return cls(lm, ledger=path, **kwargs)

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the bank's state, read-only views
    @property
    def capabilities(self):
        return self.spec.capabilities

    @property
    def systems(self) -> dict[int, Any]:
        """The normal-equation system of each layer (``LayerSystem`` or ``AlphaEditSystem``), where the
        form keeps one."""
        return self.bank.systems

    @property
    def states(self) -> dict:
        return self.bank.states

    @property
    def master(self) -> dict[int, torch.Tensor]:
        return self.bank.master

    @property
    def w0(self) -> dict[int, torch.Tensor]:
        return self.bank.w0

    @property
    def sigma0(self) -> dict[int, torch.Tensor]:
        return self.bank.sigma0

    def delta(self, layer: int) -> torch.Tensor:
        """``W_ℓ − W₀,ℓ: [d_out, d_in]`` (float64): everything the editor has written into ``layer``."""
        return self.bank.delta(layer)

    # ------------------------------------------------------------------ setup
    def prepare(self, progress: ProgressCallback | None = None) -> None:
        """Estimate (or read back) Σ₀ and build the per-layer states; the first step does it if needed."""
        if self.bank.ready:
            return
        hp = self.hparams
        t0 = time.perf_counter()
        sigma0 = self._lh.session.sigma0() if self._lh.session is not None else None
        if sigma0 is None:
            corpus = self.stats_corpus or wikitext_path("valid")
            stats = layer_stats(
                self.loaded, hp.layers, corpus, hp.stats_tokens, hp.stats_seq_len,
                progress=counter(progress, Phase.STATS),
                on_total=(lambda n: emit(progress, ProgressEvent(Phase.STATS, total=n, start=True))),
            )
            sigma0 = {layer: stats[layer].sigma0 for layer in hp.layers}
            if self._lh.session is not None:
                self._lh.session.store_sigma0(sigma0)
        t1 = time.perf_counter()
        self.bank.init(sigma0)
        self.setup_seconds = {"stats": t1 - t0, "factorise": time.perf_counter() - t1}

    def templates(self) -> list[str]:
        if self._templates is None:
            hp = self.hparams
            self._templates = context_templates(
                self.loaded, hp.n_context_templates, hp.context_template_len, hp.template_seed
            )
        return self._templates

    # ------------------------------------------------------------------ editing
    def apply(self, facts: Sequence[Fact], progress: ProgressCallback | None = None, *,
              values: ValueResult | None = None) -> StepReport:
        """One editing step on ``facts`` (all solved together). Returns its :class:`StepReport`.

        ``values`` reuses target values computed earlier for exactly these facts (e.g. on the
        original model, to compare sequential and one-time editing on the same targets). Refused
        before any work (:mod:`seqedit.guards`): no facts, one edit twice, a fact longer than the
        model's context.
        """
        report = self._apply(facts, progress, values)
        self._step_end(report, RunPosition(1, 1, len(report.facts), len(report.facts)))
        return report

    def _apply(self, facts: Sequence[Fact], progress: ProgressCallback | None, values: ValueResult | None) -> StepReport:
        if self._finalized:
            raise RuntimeError("this editor was finalized (end-of-run post-processing applied); start a new one")
        if self.mode == "one_time" and self.steps:
            raise RuntimeError(
                "a one_time editor solves all facts in one step and has already been applied; "
                "use mode='sequential' for further steps"
            )
        facts = self._with_ids(facts)
        with self._lh.first_step():
            plan = self.session.plan_apply(facts) if self.session is not None else None
            self.prepare(progress)
            with self.session.one_transaction() if self.session is not None else contextlib.nullcontext():
                report, record = edit_step(self.loaded, self.bank, self.session, self.hparams, facts, self.templates,
                                           values, plan, len(self.steps) + 1, progress, self.prompt_format,
                                           lam=self._lam_after(len(facts), plan))
                if record is not None:
                    self.last_record = record
                    self.ledger.annotate(record.id, {"report": report.to_dict()})
        # the step's (K, V) are in the ledger (and on the returned report); a long run must not hold them all
        self.steps.append(dataclasses.replace(report, constraints={}))
        self._facts_solved += len(facts)
        return report

    def _lam_after(self, adding: int, plan: Plan | None) -> float | None:
        """λ of the facts in force after a step that adds ``adding`` facts by ``plan`` (the ledger's, which
        may replace facts in force), under ``hparams.lam_growth``'s schedule; ``None`` without one."""
        if not self.hparams.lam_growth:
            return None
        if plan is not None:
            return self.session.lam_after(plan)
        return self.hparams.lam_for(self._facts_solved + adding)

    def _step_end(self, report: StepReport, position: RunPosition) -> None:
        for cb in self.callbacks:
            hook = getattr(cb, "on_step_end", None)
            if hook is not None:
                hook(self, report, position)

    def run(self, facts: Sequence[Fact], batch_size: int = 100, progress: ProgressCallback | None = None, *,
            values: ValueSource | None = None, finalize: bool = True, rekey_every: int = 0) -> list[StepReport]:
        """Edit all ``facts``: steps of ``batch_size`` (sequential) or one step (one_time).

        ``values`` supplies precomputed target values per step (``values.value_result(lo, hi)`` for
        ``facts[lo:hi]``). ``finalize`` applies the end-of-run update after the last step for forms that
        have one (naive PRUNE); an editor whose form has none stays open for further runs either way.
        ``rekey_every`` K > 0 (a ledger and an exact form needed) runs :meth:`rekey` after every step that
        brings the ledger's apply steps to a multiple of K, before the callbacks see the step.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(rekey_every, bool) or not isinstance(rekey_every, int) or rekey_every < 0:
            raise ValueError(f"rekey_every must be an int >= 0, got {rekey_every!r}")
        if rekey_every:
            self._need_session("rekey_every")
            check_exact(self.spec)
        facts = check_batch(facts, "facts", allow_empty=True)
        check_fit(self.loaded, facts)
        n = len(facts)
        size = n if self.mode == "one_time" else batch_size
        # an empty sequential run has no step; an empty one-time run is refused by its single step
        bounds = [(lo, min(lo + size, n)) for lo in range(0, n, size)] or ([(0, 0)] if self.mode == "one_time" else [])
        emit(progress, ProgressEvent(Phase.STEPS, total=len(bounds), start=True))
        reports = []
        for t, (lo, hi) in enumerate(bounds, start=1):
            step_values = values.value_result(lo, hi) if values is not None else None
            report = self._apply(facts[lo:hi], progress, step_values)
            reports.append(report)
            if rekey_every and rekey_due(self.applied_steps(), rekey_every):
                self.rekey(progress)
            emit(progress, ProgressEvent(Phase.STEPS, advance=1, total=len(bounds)))
            if t == len(bounds) and finalize:
                self.finalize()
            self._step_end(report, RunPosition(t, len(bounds), hi, n))
        if not bounds and finalize:
            self.finalize()
        return reports

    def finalize(self) -> dict[int, torch.Tensor]:
        """Apply the end-of-run update of forms that have one (``Capabilities.finalize``: naive PRUNE
        compresses the total update ``W_T − W₀``, REFERENCE_NOTES §2.8); ``run`` calls it. Afterwards the
        editor refuses further steps. For other forms it does nothing and returns ``{}``. Idempotent.
        Returns the per-layer updates written."""
        if self._finalized or not self.bank.ready or not self.capabilities.finalize:
            return {}
        out = self.bank.finalize()
        self._finalized = True
        return out

    def apply_kv(self, K: dict[int, torch.Tensor], V: dict[int, torch.Tensor] | None = None, *,
                 R: dict[int, torch.Tensor] | None = None, facts: Sequence[Fact] | None = None) -> dict[int, torch.Tensor]:
        """Insert frozen constraints: per layer keys ``K: [d_in, n]`` and either absolute FFN-out targets
        ``V: [d_out, n]`` (the residual is taken on the current master, ``r = v − W k``) or residuals
        ``R: [d_out, n]``. Returns the per-layer ``Δ`` written.

        This is the exact linear-algebra core of a step with keys and values held fixed (exactness
        checks, replays, ``verify``). With a ledger, ``facts`` (column ``i`` is ``facts[i]``) are required
        and the step is committed like ``apply`` (replacing facts whose slot is in force);
        ``last_record`` is its journal record.
        """
        if (V is None) == (R is None):
            raise ValueError("apply_kv takes exactly one of V (absolute targets) and R= (residuals)")
        if self._lh.session is not None or self._lh.pending is not None:
            if facts is None:
                raise ValueError("with a ledger, apply_kv needs facts=[...] (one per key column) to record")
            facts = self._with_ids(facts, checked=False)
            n = {int(k.shape[1]) for k in K.values()}
            if n != {len(facts)}:
                raise ValueError(f"apply_kv got {len(facts)} facts but key columns {sorted(n)}")
        with self._lh.first_step():
            return self._apply_kv(K, V, R, facts)

    def _apply_kv(self, K: dict[int, torch.Tensor], V: dict[int, torch.Tensor] | None,
                  R: dict[int, torch.Tensor] | None, facts: list[Fact] | None) -> dict[int, torch.Tensor]:
        plan = self.session.plan_apply(facts) if self.session is not None else None
        self.prepare()
        removed = self.session.removed_kv(plan) if plan is not None else None

        def columns(_i: int, layer: int):
            return K[layer], None if R is None else R[layer], None if V is None else V[layer]

        n = {int(k.shape[1]) for k in K.values()}.pop() if K else 0
        with self.bank.transaction():
            lam = self._lam_after(n, plan)
            if lam is not None:
                self.bank.set_lam(lam)
            done = solve_layers(self.bank, self.session, self.hparams.layers, columns, removed=removed)
            if plan is not None:
                self.last_record = self.session.commit_apply(facts, plan, done.constraints, done.update_norms,
                                                             self.hparams.to_dict())
        self._facts_solved += n
        return done.deltas

    # ------------------------------------------------------------------ ledger
    def _with_ids(self, facts: Iterable[Fact], checked: bool = True) -> list[Fact]:
        # apply_kv reads no tokens: only its plan (the ledger's, if any) vets the facts' ids and slots
        facts = check_batch(facts, "facts", distinct=checked)
        if checked:
            check_fit(self.loaded, facts)
        base = (self._lh.ledger.last_step if self._lh.ledger is not None else len(self.steps)) + 1
        return [f if f.id else f.with_id(f"s{base}-{i}") for i, f in enumerate(facts)]

