"""Method registry: each editing method as pure per-layer linear algebra (REFERENCE_NOTES §2).

A :class:`MethodSpec` (name + alignment + options) builds one :class:`LayerMethodState` per edited
layer from ``Σ₀: [d_in, d_in]``, ``λ`` and ``W₀: [d_out, d_in]``. Each step gets the batch's keys
``K: [d_in, n]`` and residuals ``R = V − W K: [d_out, n]`` on the **deployed** weight ``W`` and
returns a :class:`StepResult`; the caller deploys ``W + applied`` and, after the last step, adds
``finalize(W)`` if it is not ``None``. Nothing here knows about models; everything is float64.

Methods and alignments (first alignment = default of :func:`parse_method`):

============== ===================================================================================
memit          ``aligned`` (MEMIT_seq §2.3: accumulated Gram, exact OTE) | ``naive`` (§2.2: only the
               current batch's Gram, a fresh solve each step)
alphaedit      ``aligned`` (cache_c) | ``naive`` (Eq. 3) | ``full`` (Prop. 3.2 with the λ·U0ᵀΣ₀U0 term)
prune, rect    ``aligned`` (Algorithm 1 with error compensation E, §2.6) | ``uncorrected`` (MEMIT_seq +
               R_p per step, §2.7) | ``naive`` (§2.8: naive MEMIT + per-step RECT, or naive MEMIT
               and PRUNE of the total update after the last step)
rlsedit        ``aligned`` (ANCHORS §1.3–1.4: cumulative ridge + anchor objective, Woodbury state)
memorize_latest ``exact`` (§2.9, Eq. 31/32 as one add+remove update) | ``nullspace`` (Table 1 control)
============== ===================================================================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from seqedit.linalg import AlphaEditSystem, ErrorCompensation, LayerSystem, NullSpace, PostProcessor, prune, rect

__all__ = [
    "METHODS",
    "LayerMethodState",
    "MethodSpec",
    "StepResult",
    "equivalence",
    "parse_method",
]

METHODS: dict[str, tuple[str, ...]] = {
    "memit": ("aligned", "naive"),
    "alphaedit": ("aligned", "naive", "full"),
    "prune": ("aligned", "uncorrected", "naive"),
    "rect": ("aligned", "uncorrected", "naive"),
    "rlsedit": ("aligned",),
    "memorize_latest": ("exact", "nullspace"),
}
"""Valid ``(name, alignment)`` combinations; the first alignment of each name is its default."""

POST_PROCESSED = ("prune", "rect")

# The official *_err files (Algorithm 1) add a unit ridge I to C_t (REFERENCE_NOTES §2.6, subtlety 3);
# MEMIT_seq, the ablations and naive MEMIT have none.
_ERR_RIDGE = 1.0


def _combinations() -> str:
    return "; ".join(f"{n}: {', '.join(a)}" for n, a in METHODS.items())


def _check_float(value: Any, name: str, *, positive: bool = False, upper: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '≥ 0'}, got {value!r}")
    if upper is not None and v > upper:
        raise ValueError(f"{name} must be ≤ {upper:g}, got {value!r}")
    return v


@dataclass(frozen=True)
class MethodSpec:
    """One editing method: ``name``, ``alignment`` and its options (validated on construction).

    Options (each used only by the methods named):

    - ``ridge`` ρ of ``A = λΣ₀ + ρI + Σ kkᵀ`` (memit, prune, rect, rlsedit, memorize_latest). ``None``
      means the reference's default: 1.0 for prune/rect ``aligned`` (the official ``_err`` files),
      0.0 otherwise. For rlsedit it is RLSEdit's λ² of ``λ²‖W − W₀‖²``.
    - ``mu2`` (rlsedit): RLSEdit's μ². Its anchor ``μ²K₀K₀ᵀ`` is ``mu2·lam·Σ₀`` here (``lam`` being the
      covariance weight ``mom2_update_weight``; the shipped configs use μ = 1).
    - ``threshold``, ``alpha`` (alphaedit, memorize_latest ``nullspace``): null-space eigenvalue
      threshold of the un-scaled Σ₀ and AlphaEdit's ``L2`` (its ridge on the total update).
    - ``top_percent`` (rect): entries kept per step. The aligned reference file uses 20; the
      reference's uncorrected and naive files use 40: pass it explicitly to reproduce those.
    - ``reproduce_official_prune`` (prune ``naive`` only): deploy the official
      ``W_T + PRUNE(W_T − W₀)`` (counts the update twice, REFERENCE_NOTES §2.8) instead of the
      correct ``W₀ + PRUNE(W_T − W₀)``.
    """

    name: str
    alignment: str
    ridge: float | None = None
    mu2: float = 1.0
    threshold: float = 2e-2
    alpha: float = 10.0
    top_percent: float = 20.0
    reproduce_official_prune: bool = False

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; valid (method: alignments): {_combinations()}")
        if self.alignment not in METHODS[self.name]:
            raise ValueError(
                f"method {self.name!r} has no alignment {self.alignment!r}; valid: {', '.join(METHODS[self.name])} "
                f"(all: {_combinations()})"
            )
        uses_alpha = self.name == "alphaedit" or (self.name, self.alignment) == ("memorize_latest", "nullspace")
        if self.ridge is not None:
            if uses_alpha:
                raise ValueError(f"{self.label} has no ridge: AlphaEdit's α (alpha) plays that role")
            _check_float(self.ridge, "ridge")
        _check_float(self.mu2, "mu2")
        if self.mu2 != 1.0 and self.name != "rlsedit":
            raise ValueError(f"mu2 applies only to rlsedit (its μ² anchor weight), not {self.label}")
        _check_float(self.threshold, "threshold", positive=True)
        _check_float(self.alpha, "alpha", positive=True)
        _check_float(self.top_percent, "top_percent", positive=True, upper=100.0)
        if not isinstance(self.reproduce_official_prune, bool):
            raise ValueError(f"reproduce_official_prune must be a bool, got {self.reproduce_official_prune!r}")
        if self.reproduce_official_prune and (self.name, self.alignment) != ("prune", "naive"):
            raise ValueError("reproduce_official_prune applies only to prune/naive (the official MEMIT_prune path)")

    @property
    def label(self) -> str:
        return f"{self.name}/{self.alignment}"

    @property
    def effective_ridge(self) -> float:
        """The ridge ρ actually used (0 for the AlphaEdit-based forms, which have none)."""
        if self.ridge is not None:
            return float(self.ridge)
        return _ERR_RIDGE if self.name in POST_PROCESSED and self.alignment == "aligned" else 0.0

    @property
    def matches_one_time(self) -> bool:
        """True for the forms whose sequential steps reproduce the one-time solution of all batches
        (``W + raw`` before R_p for prune/rect); the naive, uncorrected and memorize_latest forms are
        controls that do not."""
        return self.name != "memorize_latest" and self.alignment in ("aligned", "full")

    @property
    def post_processed(self) -> bool:
        """True for prune and rect: the deployed update differs from the solved one."""
        return self.name in POST_PROCESSED

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields; ``MethodSpec(**d)`` rebuilds the spec."""
        return dataclasses.asdict(self)

    def post(self) -> PostProcessor | None:
        """The per-step R_p of this form, called ``post(Δ, W, low_rank=None)`` with optional factors
        ``(U, X)`` of ``Δ = U Xᵀ`` (PRUNE then needs no SVD of Δ), or ``None`` (naive PRUNE applies PRUNE
        only in ``finalize``)."""
        if self.name == "rect":
            top = float(self.top_percent)
            return lambda delta, W, low_rank=None: rect(delta, W, top)
        if self.name == "prune" and self.alignment != "naive":
            return lambda delta, W, low_rank=None: prune(delta, W, low_rank=low_rank)
        return None

    def init_layer(self, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        """The state of one edited layer: ``sigma0: [d_in, d_in]`` (symmetric PSD), ``lam ≥ 0``,
        ``W0: [d_out, d_in]`` the pre-edit weight. Raises ``ValueError`` on bad shapes/values and
        ``IllConditionedError`` if the method's system is singular (e.g. ``lam = 0`` without a ridge)."""
        W0 = _as64(W0, "W0")
        if not isinstance(sigma0, Tensor) or sigma0.ndim != 2 or sigma0.shape[0] != W0.shape[1]:
            got = tuple(sigma0.shape) if isinstance(sigma0, Tensor) else type(sigma0).__name__
            raise ValueError(f"sigma0 must be a tensor [{W0.shape[1]}, {W0.shape[1]}] (d_in of W0), got {got}")
        return _state_class(self)._create(self, sigma0, float(lam), W0)


def parse_method(name: str, alignment: str | None = None, **options: Any) -> MethodSpec:
    """``MethodSpec`` for ``name`` (case-insensitive, ``-`` = ``_``) and ``alignment`` (default: the
    method's first in ``METHODS``); ``options`` are ``MethodSpec`` fields. Raises ``ValueError``
    listing the valid combinations."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid (method: alignments): {_combinations()}")
    al = METHODS[key][0] if alignment is None else str(alignment).strip().lower()
    valid = [f.name for f in dataclasses.fields(MethodSpec) if f.name not in ("name", "alignment")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {key}; valid options: {', '.join(valid)}")
    return MethodSpec(key, al, **options)


@dataclass(frozen=True)
class StepResult:
    """One step of one layer, all ``[d_out, d_in]`` float64.

    ``applied``: the update to add to the deployed ``W``. ``raw``: the solved update before R_p
    (``= applied`` for methods without post-processing). ``reference_target``: the weight the
    OTE-aligned objective wants after this step, ``W + raw``, for the forms that carry the whole
    objective (memit/alphaedit/prune/rect ``aligned``, alphaedit ``full``, rlsedit,
    memorize_latest ``exact`` for its own objective); ``None`` for the naive and uncorrected forms,
    whose state does not know it.
    """

    applied: Tensor
    raw: Tensor
    reference_target: Tensor | None


def _as64(X: Any, name: str) -> Tensor:
    if not isinstance(X, Tensor) or X.ndim != 2:
        got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got {got}")
    X = X.to(torch.float64)
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return X


class LayerMethodState:
    """Per-layer state of one method; build it with :meth:`MethodSpec.init_layer`.

    Invariant of the aligned forms: with fixed ``(K, V)`` and ``R = V − W K`` on the deployed ``W``,
    ``W_{t−1} + raw_t`` equals the one-time solution of all batches so far (for prune/rect aligned
    thanks to Algorithm 1's E). States are transactional where their components are: a failed step
    (bad shapes, singular system) leaves them unchanged.
    """

    spec: MethodSpec
    _aligned: ClassVar[bool] = True

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec

    @classmethod
    def _create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        raise NotImplementedError

    def step(self, K: Tensor, R: Tensor, W: Tensor) -> StepResult:
        """Edit with keys ``K: [d_in, n]`` and residuals ``R: [d_out, n]`` on the deployed
        ``W: [d_out, d_in]``; returns :class:`StepResult` (the state advances to this step)."""
        W = _as64(W, "W")
        applied, raw = self._step(_as64(K, "K").to(W.device), _as64(R, "R").to(W.device), W)
        return StepResult(applied, raw, W + raw if self._aligned else None)

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @property
    def system(self) -> Any:
        """The normal-equation system carried across steps (``LayerSystem`` / ``AlphaEditSystem``), or
        ``None`` for forms that keep none (naive MEMIT/PRUNE/RECT solve afresh each step)."""
        return None

    def finalize(self, W: Tensor) -> Tensor | None:
        """Update ``[d_out, d_in]`` to add to the deployed ``W`` after the last step, or ``None``
        (only naive PRUNE has one)."""
        return None

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Nested dict of tensors and JSON-safe scalars; ``from_state_dict`` restores the state."""
        return {"spec": self.spec.to_dict(), **self._dump()}

    def _dump(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, device: torch.device | str | None = None) -> LayerMethodState:
        if "spec" not in state:
            raise ValueError("method state is missing 'spec'")
        spec = MethodSpec(**state["spec"])
        self = _state_class(spec).__new__(_state_class(spec))
        self.spec = spec
        self._load(state, device)
        return self

    def _load(self, state: dict[str, Any], device: torch.device | str | None) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.label})"


def _need(state: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"method state is missing {missing}")


def _tensor(state: dict[str, Any], key: str, device: torch.device | str | None) -> Tensor | None:
    X = state.get(key)
    if X is None:
        return None
    X = _as64(X, f"state[{key!r}]")
    return X if device is None else X.to(device)


class _OneSystem(LayerMethodState):
    """States whose persistent part is one ``_system`` (a ``LayerSystem`` or an ``AlphaEditSystem``)."""

    _system: Any
    _system_cls: ClassVar[type] = LayerSystem

    @property
    def system(self) -> Any:
        return self._system

    def _dump(self) -> dict[str, Any]:
        return {"system": self._system.state_dict()}

    def _load(self, state: dict[str, Any], device: torch.device | str | None) -> None:
        _need(state, "system")
        self._system = self._system_cls.from_state_dict(state["system"], device=device)


class _Accumulated(_OneSystem):
    """memit aligned, rlsedit, and prune/rect uncorrected: one ``LayerSystem`` accumulating every
    batch's Gram; the uncorrected forms deploy ``R_p(raw)`` with no compensation (§2.7)."""

    @classmethod
    def _create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        if spec.name == "rlsedit":
            # RLSEdit maintains C_t = A_t⁻¹ by rank-n Woodbury updates and never resets it (ANCHORS §1.4,
            # observation 2: the released driver's reset is not the cumulative minimiser).
            self._system = LayerSystem(sigma0, spec.mu2 * lam, spec.effective_ridge, solver="woodbury")
        else:
            self._system = LayerSystem(sigma0, lam, spec.effective_ridge)
        return self

    @property
    def _aligned(self) -> bool:  # type: ignore[override]
        return not self.spec.post_processed

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        U, X = self._system.update_factors(K, R)
        raw = U @ X.mT
        post = self.spec.post()
        return (raw if post is None else post(raw, W, low_rank=(U, X))), raw


class _Fresh(LayerMethodState):
    """Naive MEMIT (+ per-step RECT, or PRUNE of the total at the end): each step solves against
    ``λΣ₀ + ρI + K_tK_tᵀ`` only (§2.2, §2.8)."""

    _aligned = False

    @classmethod
    def _create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        # A LayerSystem of λΣ₀ + ρI factored once; each step updates a copy (copies share the never-
        # mutated tensors), so a step costs one Cholesky of the new A and the base never changes.
        self._base = LayerSystem(sigma0, lam, spec.effective_ridge)
        self._W0 = W0.to(self._base.device) if spec.name == "prune" else None
        return self

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        U, X = self._base.copy().update_factors(K, R)
        raw = U @ X.mT
        post = self.spec.post()
        return (raw if post is None else post(raw, W, low_rank=(U, X))), raw

    def finalize(self, W: Tensor) -> Tensor | None:
        """Naive PRUNE: compress the total update ``W − W₀`` relative to ``σ_max(W₀)`` and return the
        update that deploys ``W₀ + PRUNE(W − W₀)`` (or, with ``reproduce_official_prune``, the official
        ``W + PRUNE(W − W₀)``). ``None`` for the other naive forms."""
        if self._W0 is None:
            return None
        W = _as64(W, "W").to(self._W0.device)
        total = W - self._W0
        pruned = prune(total, self._W0)
        return pruned if self.spec.reproduce_official_prune else pruned - total

    def _dump(self) -> dict[str, Any]:
        return {"base": self._base.state_dict(), "W0": None if self._W0 is None else self._W0.contiguous()}

    def _load(self, state: dict[str, Any], device: torch.device | str | None) -> None:
        _need(state, "base", "W0")
        self._base = LayerSystem.from_state_dict(state["base"], device=device)
        self._W0 = _tensor(state, "W0", device)
        if self.spec.name == "prune" and self._W0 is None:
            raise ValueError("naive PRUNE state needs 'W0'")


class _Alpha(_OneSystem):
    """AlphaEdit (reduced r×r null-space system, §2.4) and memorize_latest ``nullspace``.

    memorize_latest/nullspace is the paper's Table 1 "Null Space" control: the naive AlphaEdit solve
    ``Δ_t (K_tK_tᵀP + αI) = R_tK_tᵀP`` with the current batch only — i.e. Eq. (32) with its removal
    term ``−λΔ^{tot}_{t−1}Σ₀`` dropped (the projector assumes ``Δ^{tot}Σ₀ ≈ 0`` because Δ's rows lie in
    the near-null space of Σ₀) and ``λΣ₀`` replaced by α on that space. Its updates are exactly those
    of alphaedit/naive.
    """

    _system_cls = AlphaEditSystem

    @classmethod
    def _create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        full = spec.alignment == "full"
        null = NullSpace.from_sigma0(sigma0, spec.threshold)
        # λ never enters the reference's solve; only Prop. 3.2's full objective weights U0ᵀΣ₀U0 by it.
        self._system = AlphaEditSystem(null, spec.alpha, lam if full else 0.0, full)
        return self

    @property
    def _accumulate(self) -> bool:
        return self.spec.alignment in ("aligned", "full")

    @property
    def _aligned(self) -> bool:  # type: ignore[override]
        return self._accumulate

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        raw = self._system.update(K, R, accumulate=self._accumulate)
        return raw, raw


class _Compensated(_OneSystem):
    """prune/rect aligned: Algorithm 1 (§2.6), ``LayerSystem`` with ridge (default 1) plus the carried
    error E, so ``W_{t−1} + raw_t`` is the unprocessed one-time solution at every step."""

    @classmethod
    def _create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        self._system = LayerSystem(sigma0, lam, spec.effective_ridge)
        self._ec = ErrorCompensation(W0.shape[0], W0.shape[1], device=self._system.device)
        return self

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        post = self.spec.post()
        assert post is not None
        return self._ec.step(self._system, K, R, W, post, low_rank=True)

    def _dump(self) -> dict[str, Any]:
        return {**super()._dump(), "ec": self._ec.state_dict()}

    def _load(self, state: dict[str, Any], device: torch.device | str | None) -> None:
        _need(state, "ec")
        super()._load(state, device)
        self._ec = ErrorCompensation.from_state_dict(state["ec"], device=self._system.device)


class _Latest(_OneSystem):
    """memorize_latest/exact: after step t, ``W`` solves ``min ‖(W − W₀)K₀‖² + ρ‖W − W₀‖² + ‖W K_t − V_t‖²``
    (§2.9, Eq. 31/32), i.e. ``(W − W₀)(λΣ₀ + ρI + K_tK_tᵀ) = (V_t − W₀K_t)K_tᵀ``.

    One ``LayerSystem`` update adds the new batch and removes the previous one: the removal residual
    ``V_{t−1} − W K_{t−1}`` is taken on the current ``W`` with ``V_{t−1} = R_{t−1} + W_{t−2}K_{t−1}``, the
    target values in force at step t−1. This is Eq. (31) (and, by the step-(t−1) normal equation,
    Eq. (32)) without forming ``Δ^{tot}`` or the λΣ₀ product.
    """

    @classmethod
    def _create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        self._system = LayerSystem(sigma0, lam, spec.effective_ridge)
        self._K_prev: Tensor | None = None
        self._V_prev: Tensor | None = None
        return self

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        V = R + W @ K
        if self._K_prev is None:
            raw = self._system.update(K, R)
        else:
            raw = self._system.update(K, R, self._K_prev, self._V_prev - W @ self._K_prev)
        self._K_prev, self._V_prev = K, V
        return raw, raw

    def _dump(self) -> dict[str, Any]:
        prev = {k: None if v is None else v.contiguous() for k, v in (("K_prev", self._K_prev), ("V_prev", self._V_prev))}
        return {**super()._dump(), **prev}

    def _load(self, state: dict[str, Any], device: torch.device | str | None) -> None:
        _need(state, "K_prev", "V_prev")
        super()._load(state, device)
        self._K_prev = _tensor(state, "K_prev", self._system.device)
        self._V_prev = _tensor(state, "V_prev", self._system.device)
        if (self._K_prev is None) != (self._V_prev is None):
            raise ValueError("memorize_latest state needs both or neither of K_prev, V_prev")


def _state_class(spec: MethodSpec) -> type[LayerMethodState]:
    name, al = spec.name, spec.alignment
    if name == "alphaedit" or (name, al) == ("memorize_latest", "nullspace"):
        return _Alpha
    if name == "memorize_latest":
        return _Latest
    if al == "naive":
        return _Fresh
    if al == "aligned" and name in POST_PROCESSED:
        return _Compensated
    return _Accumulated


# ---------------------------------------------------------------------------------------- verification


def _rel_gap(W: Tensor, W_ref: Tensor, W0: Tensor) -> float:
    scale = torch.linalg.matrix_norm(W_ref - W0).item()
    gap = torch.linalg.matrix_norm(W - W_ref).item()
    return gap / scale if scale > 0 else (0.0 if gap == 0 else math.inf)


def _run(spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor, batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Deployed weight after all batches (and ``finalize``) and ``W_{T−1} + raw_T`` before R_p/finalize."""
    state = spec.init_layer(sigma0, lam, W0)
    W = W0
    W_raw = W0
    for K, V in batches:
        K = _as64(K, "K").to(W.device)
        res = state.step(K, _as64(V, "V").to(W.device) - W @ K, W)
        W_raw = W + res.raw
        W = W + res.applied
    fin = state.finalize(W)
    return (W if fin is None else W + fin), W_raw


def equivalence(
    spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor, batches: list[tuple[Tensor, Tensor]]
) -> dict[str, Any]:
    """Sequential vs one-time editing of fixed batches ``(K: [d_in, n_i], V: [d_out, n_i])``.

    Sequential: one step per batch with ``R = V − W K`` on the deployed ``W``; one-time: a fresh state
    and one step with all columns. Returns JSON-safe ``{"method", "steps", "n_facts",
    "gap_deployed", "gap_raw"}``: ``gap_deployed = ‖W_SE − W_OTE‖_F / ‖W_OTE − W₀‖_F`` on the deployed
    weights (after ``finalize``); for prune/rect also ``gap_raw``, the same gap of ``W_{T−1} + raw_T``
    against the unprocessed one-time ``W₀ + raw`` (``None`` for the other methods). Aligned forms
    give round-off gaps; naive and uncorrected forms do not (memorize_latest is not meant to match:
    it keeps only the newest batch).
    """
    if not batches:
        raise ValueError("equivalence needs at least one (K, V) batch")
    W0 = _as64(W0, "W0")
    W_se, W_se_raw = _run(spec, sigma0, lam, W0, batches)
    K_all = torch.cat([_as64(K, "K").to(W0.device) for K, _ in batches], dim=1)
    V_all = torch.cat([_as64(V, "V").to(W0.device) for _, V in batches], dim=1)
    W_ote, W_ote_raw = _run(spec, sigma0, lam, W0, [(K_all, V_all)])
    return {
        "method": spec.label,
        "steps": len(batches),
        "n_facts": K_all.shape[1],
        "gap_deployed": _rel_gap(W_se, W_ote, W0),
        "gap_raw": _rel_gap(W_se_raw, W_ote_raw, W0) if spec.post_processed else None,
    }
