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

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .facts import Fact
from .locate.keys import ContextRows, KeyReader
from .locate.stats import layer_stats
from .locate.templates import context_templates
from .locate.values import ValueResult, compute_values
from .models.load import LoadedModel, load_model
from .methods import LayerMethodState, MethodSpec, parse_method
from .models.presets import EditHParams, preset_for

MODES = ("sequential", "one_time")


@dataclass
class StepReport:
    """What one step did: its facts (with ids), per-phase seconds and per-layer residual norms.

    ``residual_norms[layer]`` is ‖Z − H‖_F at the z-layer just before that layer was solved;
    ``final_residual`` the same after the last layer (what the edit left unexplained).
    ``seconds`` has ``templates, values, keys, solve, apply, total``.
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
        }


class Editor:
    """Edits facts into a model, keeping the exact normal-equation state of each edited layer.

    ``Editor(model, method="memit", mode="sequential")`` with ``model`` a :class:`LoadedModel` or a
    name for :func:`~seqedit.load_model`. ``hparams`` defaults to the model's preset; keyword
    ``overrides`` replace single fields (``layers=(3, 4)``, ``lam=1e4``, ...). ``stats_corpus`` is the
    text file Σ₀ is estimated on (default: WikiText-2 valid from the shared data).
    """

    def __init__(
        self,
        model: LoadedModel | str,
        method: str = "memit",
        mode: str = "sequential",
        *,
        alignment: str | None = None,
        method_options: dict | None = None,
        hparams: EditHParams | None = None,
        stats_corpus: str | None = None,
        **overrides,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        self.loaded = load_model(model) if isinstance(model, str) else model
        hp = hparams or preset_for(self.loaded.name, self.loaded.adapter.n_layers)
        self.hparams = hp.override(**overrides)
        options = dict(method_options or {})
        if self.hparams.ridge and "ridge" not in options:
            options["ridge"] = self.hparams.ridge
        self.spec: MethodSpec = parse_method(method, alignment, **options)
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
        corpus = self.stats_corpus or wikitext_path("valid")
        cb = (lambda n: progress("stats", n, None)) if progress else None
        total = (lambda n: progress("stats-total", 0, n)) if progress else None
        stats = layer_stats(
            self.loaded, hp.layers, corpus, hp.stats_tokens, hp.stats_seq_len, progress=cb, on_total=total
        )
        t1 = time.perf_counter()
        for layer in hp.layers:
            w = self.loaded.adapter.weight(layer).to(torch.float64).cpu().clone()
            self.states[layer] = self.spec.init_layer(stats[layer].sigma0, hp.lam, w)
            self.w0[layer] = w
            self.master[layer] = w.clone()
        self.setup_seconds = {"stats": t1 - t0, "factorise": time.perf_counter() - t1}

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
        with self._transaction():
            for i, layer in enumerate(hp.layers):
                t = time.perf_counter()
                K = ctx_reader.read([layer], frozen_below=layer).keys[layer]
                H = bare_reader.read([], z_layer=hp.z_layer, frozen_below=layer).z_hidden
                sec["keys"] += time.perf_counter() - t
                resid = values.z - H
                residual_norms[layer] = float(resid.norm())
                t = time.perf_counter()
                delta = self._solve(layer, K, resid / (n_layers - i))
                sec["solve"] += time.perf_counter() - t
                t = time.perf_counter()
                self._write(layer, delta)
                update_norms[layer] = float(delta.norm())
                sec["apply"] += time.perf_counter() - t
                if progress:
                    progress("layers", 1, n_layers)
        target_norm = residual_norms[hp.layers[0]]
        t = time.perf_counter()
        H = bare_reader.read([], z_layer=hp.z_layer).z_hidden
        final = float((values.z - H).norm())
        sec["keys"] += time.perf_counter() - t
        sec["total"] = sum(sec.values())
        report = StepReport(
            id=len(self.steps) + 1,
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
        )
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


    def apply_kv(self, keys: dict[int, torch.Tensor], residuals_or_values: dict[int, torch.Tensor], *, values: bool = True) -> dict[int, torch.Tensor]:
        """Insert frozen constraints: per layer ``K: [d_in, n]`` and targets ``V: [d_out, n]``.

        With ``values=True`` the targets are absolute FFN-out outputs ``v`` and the residual is taken
        on the current master weight (``r = v − W k``); otherwise they are residuals already.
        Returns the per-layer ``Δ`` written. This is the exact linear-algebra core of a step with
        keys and values held fixed (used by exactness checks, replays and ``verify``).
        """
        self._ensure_state()
        out = {}
        with self._transaction():
            for layer in self.hparams.layers:
                K = keys[layer].to(torch.float64)
                R = residuals_or_values[layer].to(torch.float64)
                if values:
                    R = R - self.master[layer] @ K
                out[layer] = self._solve(layer, K, R)
                self._write(layer, out[layer])
        return out

    def _with_ids(self, facts: Iterable[Fact]) -> list[Fact]:
        facts = list(facts)
        if not facts:
            raise ValueError("a step needs at least one fact")
        for f in facts:
            if not isinstance(f, Fact):
                raise TypeError(f"expected seqedit.Fact, got {type(f).__name__}")
        base = len(self.steps) + 1
        return [f if f.id else f.with_id(f"s{base}-{i}") for i, f in enumerate(facts)]
