"""The editor: runs locate → solve → apply steps whose sum equals the one-time solution.

Per edited layer ℓ it keeps the method's state (:mod:`seqedit.methods`; for aligned MEMIT a
:class:`~seqedit.linalg.LayerSystem` with ``A = λΣ₀ + ρI + Σ_facts k kᵀ``, DESIGN.md §2) and a float64
master copy of the weight, so repeated small updates are not rounded away by the model's dtype. A step on n facts:

1. optimise target values ``z`` at the z-layer (batched, on the current model);
2. for each edited layer in ascending order: read keys ``K_i`` and the z-layer state ``H_i`` on the
   current model, take the residual share ``R_i = (Z − H_i) / (L − i)``, solve
   ``Δ_i = R_i (A_new⁻¹ K_i)ᵀ`` and apply it before the next layer reads its keys.

With keys and values held fixed, the sum of the steps' Δ equals the one-time update of all facts
(``apply_kv`` exposes that identity; see ``tests/test_editor.py`` and ``tests/test_exactness.py``).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .errors import SeqEditError
from .facts import Fact
from .locate.keys import ContextRows, KeyReader
from .locate.stats import layer_stats
from .locate.templates import context_templates
from .locate.values import ValueResult, compute_values
from .models.load import LoadedModel, load_model
from .methods import LayerMethodState, MethodSpec, parse_method
from .models.presets import EditHParams, preset_for
from .ledger import ops as ledger_ops
from .ledger import session, tensorio
from .ledger.store import Ledger, LedgerError, StepRecord

MODES = ("sequential", "one_time")
DEFAULT_METHOD = "memit"


@dataclass
class StepReport:
    """What one step did: its facts (with ids), per-phase seconds and per-layer residual norms.

    ``residual_norms[layer]`` is ‖Z − H‖_F at the z-layer just before that layer was solved;
    ``final_residual`` the same after the last layer (what the edit left unexplained).
    ``seconds`` has ``templates, values, keys, solve, apply, total`` (and ``commit`` with a ledger).
    With a ledger, ``removed`` lists the ids of the facts the step replaced (or, for memorize_latest,
    forgot) and ``constraints[layer] = (K: [d_in, n], V: [d_out, n])`` the stored per-layer keys and
    absolute FFN-out targets of the step's facts (in the ledger's storage dtype).
    """

    id: int
    method: str  # MethodSpec.label, e.g. "memit/aligned"
    facts: list[Fact]
    seconds: dict[str, float]
    residual_norms: dict[int, float]
    final_residual: float
    target_norm: float  # ‖Z − H_0‖_F, the residual before any layer was edited
    value_steps: list[int]
    value_loss: list[float]
    update_norms: dict[int, float] = field(default_factory=dict)  # ‖Δ_ℓ‖_F
    value_work: dict[str, float] = field(default_factory=dict)  # tokens, padding, δ-dependent GFLOP
    removed: list[str] = field(default_factory=list)
    constraints: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "method": self.method,
            "n_facts": len(self.facts),
            "fact_ids": [f.id for f in self.facts],
            "seconds": self.seconds,
            "residual_norms": {str(k): v for k, v in self.residual_norms.items()},
            "final_residual": self.final_residual,
            "target_norm": self.target_norm,
            "mean_value_steps": sum(self.value_steps) / max(1, len(self.value_steps)),
            "update_norms": {str(k): v for k, v in self.update_norms.items()},
            "value_work": self.value_work,
            "removed": list(self.removed),
        }


class Editor:
    """Edits facts into a model, keeping the exact normal-equation state of each edited layer.

    ``Editor(model, method="memit", mode="sequential")`` with ``model`` a :class:`LoadedModel` or a
    name for :func:`~seqedit.load_model`. ``hparams`` defaults to the model's preset; keyword
    ``overrides`` replace single fields (``layers=(3, 4)``, ``lam=1e4``, ...). ``stats_corpus`` is the
    text file Σ₀ is estimated on (default: WikiText-2 valid from the shared data).

    ``ledger="dir/"`` makes the editor durable (``docs/ledger.md``): a new directory records the
    base model, method and hyperparameters; an existing one is reopened (its method and
    hyperparameters are used unless given, and must then agree) and the model's edited layers are
    restored to the last committed step. With a ledger a fact whose slot is in force is replaced,
    and ``forget``, ``undo``, ``verify``, ``export`` are available. ``kv_dtype`` (``"float64"`` or
    ``"float32"``) is the storage precision of per-fact keys/values of a new ledger; the solve uses
    the stored values, so a reopened ledger reproduces the live weights. ``snapshot_every``: steps
    between snapshots of the per-layer state (reopen replays at most that many steps).
    """

    def __init__(
        self,
        model: LoadedModel | str,
        method: str | None = None,
        mode: str = "sequential",
        *,
        alignment: str | None = None,
        method_options: dict | None = None,
        hparams: EditHParams | None = None,
        stats_corpus: str | None = None,
        ledger: str | os.PathLike | None = None,
        kv_dtype: str = "float64",
        snapshot_every: int = 10,
        **overrides,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        self.loaded = load_model(model) if isinstance(model, str) else model
        self.ledger: Ledger | None = None
        self.sigma0: dict[int, torch.Tensor] = {}  # kept with a ledger only (verify, rebuilds)
        options = dict(method_options or {})
        if ledger is not None and Ledger.exists(ledger):
            self.ledger = Ledger.open_for_writing(ledger)
            man = self.ledger.manifest
            try:
                hp = (hparams or EditHParams(**man["hparams"])).override(**overrides)
                spec = None if method is None else self._spec(method, alignment, options, hp)
                self.spec, self.hparams = session.reconcile(man, self.loaded, spec, hparams, overrides, ledger)
            except BaseException:
                self.ledger.close()
                raise
            kv_dtype, snapshot_every = man["kv_dtype"], man["snapshot_every"]
        else:
            self.hparams = (hparams or preset_for(self.loaded.name, self.loaded.adapter.n_layers)).override(**overrides)
            self.spec = self._spec(method or DEFAULT_METHOD, alignment, options, self.hparams)
        self.method, self.mode = self.spec.name, mode
        for layer in self.hparams.layers:
            if not 0 <= layer < self.loaded.adapter.n_layers:
                raise ValueError(
                    f"edited layer {layer} does not exist: the model has {self.loaded.adapter.n_layers} layers"
                )
        self.stats_corpus = stats_corpus
        self.states: dict[int, LayerMethodState] = {}
        self.w0: dict[int, torch.Tensor] = {}
        self.master: dict[int, torch.Tensor] = {}
        self.steps: list[StepReport] = []
        self._templates: list[str] | None = None
        self._finalized = False
        self.setup_seconds: dict[str, float] = {}
        self.last_record: StepRecord | None = None
        self.capabilities = ledger_ops.capabilities(self.spec)
        if ledger is not None:
            self._open_ledger(ledger, kv_dtype, snapshot_every)

    @staticmethod
    def _spec(method: str, alignment: str | None, options: dict, hp: EditHParams) -> MethodSpec:
        if hp.ridge and "ridge" not in options:
            options = {**options, "ridge": hp.ridge}
        return parse_method(method, alignment, **options)

    def _open_ledger(self, path: str | os.PathLike, kv_dtype: str, snapshot_every: int) -> None:
        if kv_dtype not in session.KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {session.KV_DTYPES}, got {kv_dtype!r}")
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError(f"snapshot_every must be an int ≥ 1, got {snapshot_every!r}")
        if self.spec.label == "prune/naive":
            raise LedgerError(
                "prune/naive prunes the total update once at the end of a run (finalize), which has no "
                "meaning for a ledger that stays open; use prune/aligned or prune/uncorrected"
            )
        self._kv_dtype = tensorio.as_dtype(kv_dtype)
        self.ledger_snapshot_every = snapshot_every
        if self.ledger is None:
            self.ledger = Ledger.open_for_writing(path, session.manifest(self, kv_dtype, snapshot_every))
        try:
            if self.ledger.last_step:
                self._ensure_state()
                session.restore(self)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the ledger (its lock and journal connection); the model keeps its weights."""
        if self.ledger is not None:
            self.ledger.close()

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def systems(self) -> dict:
        """The normal-equation system of each layer (``LayerSystem`` or ``AlphaEditSystem``), where the
        method keeps one (every method but naive MEMIT/PRUNE/RECT)."""
        return {l: s.system for l, s in self.states.items() if s.system is not None}

    # ------------------------------------------------------------------ state
    def _ensure_state(self, progress: Callable[[str, int, int | None], None] | None = None) -> None:
        if self.states:
            return
        from .facts import wikitext_path

        hp = self.hparams
        t0 = time.perf_counter()
        sigma0 = self.ledger.sigma0(hp.layers) if self.ledger is not None else None
        if sigma0 is None:
            corpus = self.stats_corpus or wikitext_path("valid")
            cb = (lambda n: progress("stats", n, None)) if progress else None
            total = (lambda n: progress("stats-total", 0, n)) if progress else None
            stats = layer_stats(
                self.loaded, hp.layers, corpus, hp.stats_tokens, hp.stats_seq_len, progress=cb, on_total=total
            )
            sigma0 = {layer: stats[layer].sigma0 for layer in hp.layers}
            if self.ledger is not None:
                self.ledger.store_sigma0(sigma0)
        t1 = time.perf_counter()
        self._init_states(sigma0)
        self.setup_seconds = {"stats": t1 - t0, "factorise": time.perf_counter() - t1}

    def _init_states(self, sigma0: dict[int, torch.Tensor]) -> None:
        """Fresh method states from ``Σ₀`` and the model's weights, which must be the base weights
        the first time (they become ``w0``)."""
        for layer in self.hparams.layers:
            if layer not in self.w0:
                self.w0[layer] = self.loaded.adapter.weight(layer).to(torch.float64).cpu().clone()
            self.states[layer] = self.spec.init_layer(sigma0[layer], self.hparams.lam, self.w0[layer])
            self.master[layer] = self.w0[layer].clone()
            self.loaded.adapter.set_weight(layer, self.master[layer])
        if self.ledger is not None:
            self.sigma0 = dict(sigma0)

    def templates(self) -> list[str]:
        if self._templates is None:
            hp = self.hparams
            self._templates = context_templates(
                self.loaded, hp.n_context_templates, hp.context_template_len, hp.template_seed
            )
        return self._templates

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """All-or-nothing for a step: layers are written one by one (upper layers read keys on the
        updated model), so a failure part-way restores every layer's method state, master and weight.
        States share their tensors with the snapshot (they replace tensors, never modify them)."""
        saved_states = {l: s.state_dict() for l, s in self.states.items()}
        saved_master = dict(self.master)
        try:
            yield
        except BaseException:
            self.states = {l: LayerMethodState.from_state_dict(d) for l, d in saved_states.items()}
            self.master = saved_master
            for layer in self.hparams.layers:
                self.loaded.adapter.set_weight(layer, self.master[layer])
            raise

    def _solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """The update to deploy in ``layer`` for keys ``K: [d_in, n]`` and residuals ``R: [d_out, n]``
        on the current weight (the method's post-processing included)."""
        return self.states[layer].step(K, R, self.master[layer]).applied

    def _write(self, layer: int, delta: torch.Tensor) -> None:
        self.master[layer] = self.master[layer] + delta
        self.loaded.adapter.set_weight(layer, self.master[layer])

    def delta(self, layer: int) -> torch.Tensor:
        """``W_ℓ − W₀,ℓ: [d_out, d_in]`` (float64): everything the editor has written into ``layer``."""
        return self.master[layer] - self.w0[layer]

    # ------------------------------------------------------------------ editing
    def apply(
        self,
        facts: Sequence[Fact],
        progress: Callable[[str, int, int | None], None] | None = None,
        *,
        values: ValueResult | None = None,
    ) -> StepReport:
        """One editing step on ``facts`` (all solved together). Returns its :class:`StepReport`.

        ``values`` reuses target values computed earlier for exactly these facts (e.g. on the
        original model, to compare sequential and one-time editing on the same targets).
        """
        if self._finalized:
            raise RuntimeError("this editor was finalized (end-of-run post-processing applied); start a new one")
        if self.mode == "one_time" and self.steps:
            raise RuntimeError(
                "a one_time editor solves all facts in one step and has already been applied; "
                "use mode='sequential' for further steps"
            )
        facts = self._with_ids(facts)
        plan = self._plan_apply(facts)
        hp, tok = self.hparams, self.loaded.tokenizer
        self._ensure_state(progress)
        sec: dict[str, float] = {}
        t = time.perf_counter()
        templates = self.templates()
        ctx = ContextRows.build(tok, facts, templates)  # validates every subject before any work
        bare = ContextRows.build(tok, facts, ["{}"])
        sec["templates"] = time.perf_counter() - t

        t = time.perf_counter()
        value_work: dict[str, float] = {}
        if values is None:
            cb = (lambda n: progress("values", n, len(facts))) if progress else None
            values = compute_values(self.loaded, facts, templates, hp, progress=cb)
            value_work = {
                "iterations": values.iterations,
                "suffix_tokens": values.row_tokens,
                "padded_tokens": values.padded_tokens,
                "scored_positions": values.head_positions,
                "delta_gflop": values.delta_flops(self.loaded, hp.z_layer) / 1e9,
            }
        elif values.z.shape[1] != len(facts):
            raise ValueError(f"values hold {values.z.shape[1]} facts, the step has {len(facts)}")
        sec["values"] = time.perf_counter() - t

        sec["keys"] = sec["solve"] = sec["apply"] = 0.0
        residual_norms: dict[int, float] = {}
        update_norms: dict[int, float] = {}
        n_layers = len(hp.layers)
        # layers are edited in ascending order, so once layer ℓ is read the blocks below it are final
        ctx_reader = KeyReader(self.loaded, ctx, hp.key_batch_rows)
        bare_reader = KeyReader(self.loaded, bare, hp.key_batch_rows)
        removed = self._removed_kv(plan)
        constraints: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        record: StepRecord | None = None
        with self._transaction():
            for i, layer in enumerate(hp.layers):
                t = time.perf_counter()
                K = ctx_reader.read([layer], frozen_below=layer).keys[layer]
                H = bare_reader.read([], z_layer=hp.z_layer, frozen_below=layer).z_hidden
                sec["keys"] += time.perf_counter() - t
                resid = values.z - H
                residual_norms[layer] = float(resid.norm())
                t = time.perf_counter()
                R = resid / (n_layers - i)
                if self.ledger is None:
                    delta = self._solve(layer, K, R)
                else:
                    K = K.to(self.master[layer].device, torch.float64)
                    V = self.master[layer] @ K + R.to(K.device, torch.float64)
                    delta = self._ledger_layer(layer, K, V, removed, constraints)
                sec["solve"] += time.perf_counter() - t
                t = time.perf_counter()
                self._write(layer, delta)
                update_norms[layer] = float(delta.norm())
                sec["apply"] += time.perf_counter() - t
                if progress:
                    progress("layers", 1, n_layers)
            if plan is not None:
                t = time.perf_counter()
                record = self._commit_apply(facts, plan, constraints, {"update_norms": update_norms})
                sec["commit"] = time.perf_counter() - t
        target_norm = residual_norms[hp.layers[0]]
        t = time.perf_counter()
        H = bare_reader.read([], z_layer=hp.z_layer).z_hidden
        final = float((values.z - H).norm())
        sec["keys"] += time.perf_counter() - t
        sec["total"] = sum(sec.values())
        report = StepReport(
            id=record.id if record is not None else len(self.steps) + 1,
            method=self.spec.label,
            facts=list(facts),
            seconds=sec,
            residual_norms=residual_norms,
            final_residual=final,
            target_norm=target_norm,
            value_steps=values.steps,
            value_loss=values.loss,
            update_norms=update_norms,
            value_work=value_work,
            removed=[r.fact.id for r in plan.remove] if plan is not None else [],
            constraints=constraints,
        )
        if record is not None:
            self.last_record = record
            self.ledger.annotate(record.id, {"report": report.to_dict()})
        self.steps.append(report)
        return report

    def run(
        self,
        facts: Sequence[Fact],
        batch_size: int = 100,
        progress: Callable[[str, int, int | None], None] | None = None,
    ) -> list[StepReport]:
        """Edit all ``facts``: steps of ``batch_size`` (sequential) or one step (one_time)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.mode == "one_time":
            reports = [self.apply(facts, progress)]
        else:
            reports = [self.apply(facts[i : i + batch_size], progress) for i in range(0, len(facts), batch_size)]
        if self.ledger is None:  # a ledger stays open for further steps (prune/naive is refused there)
            self.finalize()
        return reports

    def finalize(self) -> dict[int, torch.Tensor]:
        """Apply the end-of-run update of methods that have one (naive PRUNE compresses the total
        update ``W_T − W₀``, REFERENCE_NOTES §2.8); ``run`` calls it. Idempotent: later calls do nothing.
        Returns the per-layer updates written."""
        if self._finalized or not self.states:
            return {}
        out: dict[int, torch.Tensor] = {}
        with self._transaction():
            for layer, state in self.states.items():
                delta = state.finalize(self.master[layer])
                if delta is not None:
                    self._write(layer, delta)
                    out[layer] = delta
        self._finalized = True
        return out


    def apply_kv(
        self,
        keys: dict[int, torch.Tensor],
        residuals_or_values: dict[int, torch.Tensor],
        *,
        values: bool = True,
        facts: Sequence[Fact] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Insert frozen constraints: per layer ``K: [d_in, n]`` and targets ``V: [d_out, n]``.

        With ``values=True`` the targets are absolute FFN-out outputs ``v`` and the residual is taken
        on the current master weight (``r = v − W k``); otherwise they are residuals already.
        Returns the per-layer ``Δ`` written. This is the exact linear-algebra core of a step with
        keys and values held fixed (used by exactness checks, replays and ``verify``). With a ledger,
        ``facts`` (column ``i`` is ``facts[i]``) are required and the step is committed like ``apply``
        (replacing facts whose slot is in force); ``last_record`` is its journal record.
        """
        plan = None
        if self.ledger is not None:
            if facts is None:
                raise ValueError("with a ledger, apply_kv needs facts=[...] (one per key column) to record")
            facts = self._with_ids(facts)
            n = {int(k.shape[1]) for k in keys.values()}
            if n != {len(facts)}:
                raise ValueError(f"apply_kv got {len(facts)} facts but key columns {sorted(n)}")
            plan = self._plan_apply(facts)
        self._ensure_state()
        removed = self._removed_kv(plan)
        constraints: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        out = {}
        with self._transaction():
            for layer in self.hparams.layers:
                W = self.master[layer]
                K = keys[layer].to(W.device, torch.float64)
                T = residuals_or_values[layer].to(W.device, torch.float64)
                if self.ledger is None:
                    out[layer] = self._solve(layer, K, T - W @ K if values else T)
                else:
                    out[layer] = self._ledger_layer(layer, K, T if values else W @ K + T, removed, constraints)
                self._write(layer, out[layer])
            if plan is not None:
                norms = {l: float(d.norm()) for l, d in out.items()}
                self.last_record = self._commit_apply(facts, plan, constraints, {"update_norms": norms})
        return out

    # ------------------------------------------------------------------ ledger
    def _need_ledger(self, what: str) -> Ledger:
        if self.ledger is None:
            raise SeqEditError(f"{what} needs a ledger: Editor(model, ledger='dir/')")
        if self.ledger.conn is None:
            raise SeqEditError(f"{what}: this editor's ledger was closed; reopen it with Editor(model, ledger=...)")
        return self.ledger

    def _plan_apply(self, facts: list[Fact]) -> ledger_ops.Plan | None:
        if self.ledger is None:
            return None
        return ledger_ops.plan_apply(facts, self._need_ledger("apply").in_force(), self.spec)

    def _removed_kv(self, plan: ledger_ops.Plan | None) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        """Stored (K, V) per layer of the facts a step replaces (exact-removal methods only; memorize_latest
        removes its previous batch inside its own step)."""
        if plan is None or not plan.remove or self.capabilities.removal != "system":
            return None
        return self.ledger.kv(plan.remove, self.hparams.layers)

    def _ledger_layer(self, layer: int, K: torch.Tensor, V: torch.Tensor, removed: dict | None,
                      constraints: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Solve ``layer`` for ``K: [d_in, n]``, absolute targets ``V: [d_out, n]`` (float64) rounded to the
        storage dtype first, so that a replay from the stored tensors repeats this exact computation."""
        Ks, Vs = K.to(self._kv_dtype), V.to(self._kv_dtype)
        constraints[layer] = (Ks.cpu(), Vs.cpu())
        Kr, Vr = removed[layer] if removed else (None, None)
        return ledger_ops.layer_update(self.states[layer], self.master[layer], Ks.double(), Vs.double(), Kr, Vr)

    def _commit_apply(self, facts: list[Fact], plan: ledger_ops.Plan, constraints: dict, info: dict) -> StepRecord:
        L = self.ledger
        step = L.last_step + 1
        info = {"update_norms": {str(k): v for k, v in info["update_norms"].items()}, "hparams": self.hparams.to_dict()}
        snap = session.snapshot_of(self) if session.snapshot_due(self, step) else None
        return L.commit("apply", add=facts, kv=constraints, remove=plan.remove, info=info, snapshot=snap)

    def facts_in_force(self) -> list[Fact]:
        """The facts whose constraints the edited weights hold, oldest first."""
        return [r.fact for r in self._need_ledger("facts_in_force").in_force()]

    def forget(self, ids: str | Iterable[str]) -> StepRecord:
        """Remove the facts ``ids`` (exactly: the weights become the one-time solution without them)."""
        L = self._need_ledger("forget")
        ids = [ids] if isinstance(ids, str) else list(ids)
        self._ensure_state()
        return session.execute(self, ledger_ops.plan_forget(ids, L.in_force(), self.spec))

    def undo(self, step: int | StepReport | StepRecord) -> StepRecord:
        """Revert ``step`` (an id or a report): the facts it added leave, those it replaced or forgot
        come back. Undoing an undo redoes the step."""
        L = self._need_ledger("undo")
        step_id = getattr(step, "id", step)
        if isinstance(step_id, bool) or not isinstance(step_id, int):
            raise ValueError(f"undo needs a step id (int) or a step report, got {step!r}")
        rec = L.step(step_id)
        self._ensure_state()
        plan = ledger_ops.plan_undo(rec, L.last_step, L.rows_added(step_id), L.rows_removed(step_id), L.in_force(), self.spec)
        return session.execute(self, plan)

    def verify(self, tol: float = 1e-8) -> session.VerifyReport:
        """Re-solve the one-time problem of the facts in force and compare with the live weights; check
        the ledger's file checksums (:class:`~seqedit.ledger.VerifyReport`)."""
        self._need_ledger("verify")
        return session.verify(self, tol)

    def export(self, path: str | os.PathLike, *, delta: bool = False, delta_dtype: str = "float32") -> Path:
        """Write the edited model as a plain HF directory, or with ``delta=True`` only the edited
        matrices' ``W − W₀`` and a loader (:mod:`seqedit.ledger.export`)."""
        from .ledger import export as ledger_export

        self._ensure_state()
        if delta:
            return ledger_export.export_delta(self, path, dtype=delta_dtype)
        return ledger_export.export_model(self, path)

    def _with_ids(self, facts: Iterable[Fact]) -> list[Fact]:
        facts = list(facts)
        if not facts:
            raise ValueError("a step needs at least one fact")
        for f in facts:
            if not isinstance(f, Fact):
                raise TypeError(f"expected seqedit.Fact, got {type(f).__name__}")
        base = (self.ledger.last_step if self.ledger is not None else len(self.steps)) + 1
        return [f if f.id else f.with_id(f"s{base}-{i}") for i, f in enumerate(facts)]
