"""The built-in methods as per-layer states, and their registration (REFERENCE_NOTES §2).

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

Options: ``ridge`` ρ of ``A = λΣ₀ + ρI + Σ kkᵀ`` (default 1.0 for prune/rect ``aligned``, the official
``_err`` files, else 0; for rlsedit RLSEdit's λ² of ``λ²‖W − W₀‖²``); ``mu2`` (rlsedit: its anchor
``μ²K₀K₀ᵀ`` is ``mu2·lam·Σ₀``, ``lam`` being ``mom2_update_weight``); ``threshold``, ``alpha`` (the
null-space forms: eigenvalue threshold of the un-scaled Σ₀ and AlphaEdit's ``L2``); ``top_percent``
(rect: entries kept per step; the aligned reference uses 20, its uncorrected and naive files 40);
``reproduce_official_prune`` (prune ``naive``: deploy the official ``W_T + PRUNE(W_T − W₀)``, which
counts the update twice, §2.8, instead of ``W₀ + PRUNE(W_T − W₀)``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from seqedit.linalg import (
    AlphaEditSystem,
    ErrorCompensation,
    LayerSystem,
    NullSpace,
    PostProcessor,
    prune,
    rect,
)

from .registry import Capabilities, Form, Option, float_option, register_method
from .spec import MethodSpec
from .state import LayerMethodState
from .tensors import as64, need, stored_tensor

__all__ = ["OPTIONS"]


def _bool(name: str):
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
        return value

    return check


RIDGE = float_option("ridge", 0.0, "ρ of A = λΣ₀ + ρI + Σ kkᵀ (rlsedit: its λ²)")
MU2 = float_option("mu2", 1.0, "RLSEdit's μ²: anchor weight μ²·λΣ₀")
THRESHOLD = float_option("threshold", 2e-2, "null-space eigenvalue threshold of the un-scaled Σ₀", positive=True)
ALPHA = float_option("alpha", 10.0, "AlphaEdit's L2: ridge on the total update", positive=True)
TOP_PERCENT = float_option("top_percent", 20.0, "RECT: entries kept per step (percent)", positive=True, upper=100.0)
REPRODUCE_PRUNE = Option("reproduce_official_prune", False, _bool("reproduce_official_prune"),
                         "deploy the official W_T + PRUNE(W_T − W₀)")
OPTIONS = (RIDGE, MU2, THRESHOLD, ALPHA, TOP_PERCENT, REPRODUCE_PRUNE)

# The official *_err files (Algorithm 1) add a unit ridge I to C_t (REFERENCE_NOTES §2.6, subtlety 3);
# MEMIT_seq, the ablations and naive MEMIT have none.
_ERR_RIDGE = 1.0
_NO_RIDGE = {"ridge": "AlphaEdit's α (alpha) plays that role"}


def _post(spec: MethodSpec) -> PostProcessor | None:
    """The per-step R_p of a prune/rect form, called ``post(Δ, W, low_rank=None)`` with optional factors
    ``(U, X)`` of ``Δ = U Xᵀ`` (PRUNE then needs no SVD of Δ)."""
    if spec.name == "rect":
        top = float(spec.top_percent)
        return lambda delta, W, low_rank=None: rect(delta, W, top)
    if spec.name == "prune":
        return lambda delta, W, low_rank=None: prune(delta, W, low_rank=low_rank)
    return None


def _factored_step(spec: MethodSpec, system: LayerSystem, K: Tensor, R: Tensor, W: Tensor,
                   post: PostProcessor | None) -> tuple[Tensor, Tensor]:
    """``(applied, raw)`` of one update of ``system``; R_p gets the low-rank factors of ``raw = U Xᵀ``."""
    U, X = system.update_factors(K, R)
    raw = U @ X.mT
    return (raw if post is None else post(raw, W, low_rank=(U, X))), raw


class _OneSystem(LayerMethodState):
    """States whose persistent part is one ``_system`` (a ``LayerSystem`` or an ``AlphaEditSystem``)."""

    _system: Any
    _system_cls: ClassVar[type] = LayerSystem

    @property
    def system(self) -> Any:
        return self._system

    def _dump(self) -> dict[str, Any]:
        return {"system": self._system.state_dict()}

    def _load(self, state: dict[str, Any], device: Any) -> None:
        need(state, "system")
        self._system = self._system_cls.from_state_dict(state["system"], device=device)


class _Accumulated(_OneSystem):
    """memit aligned and prune/rect uncorrected: one ``LayerSystem`` accumulating every batch's Gram;
    the uncorrected forms deploy ``R_p(raw)`` with no compensation (§2.7)."""

    @classmethod
    def create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        self._system = LayerSystem(sigma0, lam, spec.effective_ridge)
        return self

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        return _factored_step(self.spec, self._system, K, R, W, _post(self.spec))

    _lam_scale: ClassVar[str | None] = None  # the spec field scaling λ in this form's system

    def relam(self, lam: float, sigma0: Tensor, W: Tensor, W0: Tensor) -> Tensor:
        # the deployed W is the system's optimum only without R_p (an uncorrected prune/rect is not)
        if _post(self.spec) is not None:
            return super().relam(lam, sigma0, W, W0)
        scale = 1.0 if self._lam_scale is None else float(getattr(self.spec, self._lam_scale))
        W = as64(W, "W")
        self._system, delta = self._system.with_lam(scale * float(lam), sigma0, W - as64(W0, "W0").to(W.device))
        return delta


class _Woodbury(_Accumulated):
    """rlsedit: RLSEdit maintains C_t = A_t⁻¹ by rank-n Woodbury updates and never resets it (ANCHORS
    §1.4, observation 2: the released driver's reset is not the cumulative minimiser)."""

    _lam_scale: ClassVar[str | None] = "mu2"

    @classmethod
    def create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        self._system = LayerSystem(sigma0, spec.mu2 * lam, spec.effective_ridge, solver="woodbury")
        return self


class _Fresh(LayerMethodState):
    """Naive MEMIT (+ per-step RECT): each step solves against ``λΣ₀ + ρI + K_tK_tᵀ`` only (§2.2, §2.8)."""

    _per_step_post: ClassVar[bool] = True

    @classmethod
    def create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        # A LayerSystem of λΣ₀ + ρI factored once; each step updates a copy (copies share the never-
        # mutated tensors), so a step costs one Cholesky of the new A and the base never changes.
        self._base = LayerSystem(sigma0, lam, spec.effective_ridge)
        self._init_extra(W0)
        return self

    def _init_extra(self, W0: Tensor) -> None:
        pass

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        post = _post(self.spec) if self._per_step_post else None
        return _factored_step(self.spec, self._base.copy(), K, R, W, post)

    def _dump(self) -> dict[str, Any]:
        return {"base": self._base.state_dict()}

    def _load(self, state: dict[str, Any], device: Any) -> None:
        need(state, "base")
        self._base = LayerSystem.from_state_dict(state["base"], device=device)


class _FreshPruned(_Fresh):
    """Naive PRUNE: naive MEMIT steps, then PRUNE of the total update after the last one."""

    _per_step_post = False

    def _init_extra(self, W0: Tensor) -> None:
        self._W0 = W0.to(self._base.device)

    def finalize(self, W: Tensor) -> Tensor | None:
        """Compress the total update ``W − W₀`` relative to ``σ_max(W₀)``; returns the update that deploys
        ``W₀ + PRUNE(W − W₀)`` (or, with ``reproduce_official_prune``, the official ``W + PRUNE(W − W₀)``)."""
        W = as64(W, "W").to(self._W0.device)
        total = W - self._W0
        pruned = prune(total, self._W0)
        return pruned if self.spec.reproduce_official_prune else pruned - total

    def _dump(self) -> dict[str, Any]:
        return {**super()._dump(), "W0": self._W0.contiguous()}

    def _load(self, state: dict[str, Any], device: Any) -> None:
        need(state, "W0")
        super()._load(state, device)
        self._W0 = stored_tensor(state, "W0", device)
        if self._W0 is None:
            raise ValueError("naive PRUNE state needs 'W0'")


class _Alpha(_OneSystem):
    """AlphaEdit aligned (cache_c): the reduced r×r null-space system (§2.4), accumulating every batch."""

    _system_cls = AlphaEditSystem
    _accumulate: ClassVar[bool] = True
    _full: ClassVar[bool] = False

    @classmethod
    def create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        null = NullSpace.from_sigma0(sigma0, spec.threshold)
        # λ never enters the reference's solve; only Prop. 3.2's full objective weights U0ᵀΣ₀U0 by it.
        self._system = AlphaEditSystem(null, spec.alpha, lam if cls._full else 0.0, cls._full)
        return self

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        raw = self._system.update(K, R, accumulate=self._accumulate)
        return raw, raw


class _AlphaFull(_Alpha):
    """alphaedit/full: Prop. 3.2's objective, with the λ·U0ᵀΣ₀U0 term."""

    _full = True


class _AlphaFresh(_Alpha):
    """alphaedit/naive and memorize_latest/nullspace (the paper's Table 1 "Null Space" control): the naive
    solve ``Δ_t (K_tK_tᵀP + αI) = R_tK_tᵀP`` with the current batch only — Eq. (32) with its removal term
    ``−λΔ^{tot}_{t−1}Σ₀`` dropped (the projector assumes ``Δ^{tot}Σ₀ ≈ 0``) and ``λΣ₀`` replaced by α on
    that space."""

    _accumulate = False


class _Compensated(_OneSystem):
    """prune/rect aligned: Algorithm 1 (§2.6), ``LayerSystem`` with ridge (default 1) plus the carried
    error E, so ``W_{t−1} + raw_t`` is the unprocessed one-time solution at every step."""

    @classmethod
    def create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        self._system = LayerSystem(sigma0, lam, spec.effective_ridge)
        self._ec = ErrorCompensation(W0.shape[0], W0.shape[1], device=self._system.device)
        return self

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        return self._ec.step(self._system, K, R, W, _post(self.spec), low_rank=True)

    def _dump(self) -> dict[str, Any]:
        return {**super()._dump(), "ec": self._ec.state_dict()}

    def _load(self, state: dict[str, Any], device: Any) -> None:
        need(state, "ec")
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
    def create(cls, spec: MethodSpec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
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

    def _load(self, state: dict[str, Any], device: Any) -> None:
        need(state, "K_prev", "V_prev")
        super()._load(state, device)
        self._K_prev = stored_tensor(state, "K_prev", self._system.device)
        self._V_prev = stored_tensor(state, "V_prev", self._system.device)
        if (self._K_prev is None) != (self._V_prev is None):
            raise ValueError("memorize_latest state needs both or neither of K_prev, V_prev")


# ------------------------------------------------------------------------------------ registration

_EXACT = Capabilities(removal="system", exact=True, matches_one_time=True)
_ALPHA_OPTS = {"threshold": None, "alpha": None}

register_method("memit", {
    "aligned": Form(_Accumulated, _EXACT, {"ridge": None}),
    "naive": Form(_Fresh, Capabilities(ote_same_as="aligned"), {"ridge": None}),
}, options=OPTIONS, doc="MEMIT (Meng et al., 2023) with the accumulated (aligned) or per-batch (naive) objective")

register_method("alphaedit", {
    "aligned": Form(_Alpha, _EXACT, _ALPHA_OPTS, hints=_NO_RIDGE),
    "naive": Form(_AlphaFresh, Capabilities(ote_same_as="aligned"), _ALPHA_OPTS, hints=_NO_RIDGE),
    "full": Form(_AlphaFull, _EXACT, _ALPHA_OPTS, hints=_NO_RIDGE),
}, options=OPTIONS, doc="AlphaEdit (Fang et al., 2025): updates in the approximate null space of Σ₀")

for _name in ("prune", "rect"):
    _extra = {"top_percent": None} if _name == "rect" else {}
    _naive_extra = {"reproduce_official_prune": None} if _name == "prune" else {}
    register_method(_name, {
        "aligned": Form(_Compensated, Capabilities(matches_one_time=True, post_processed=True),
                        {"ridge": _ERR_RIDGE, **_extra}),
        "uncorrected": Form(_Accumulated, Capabilities(post_processed=True), {"ridge": None, **_extra}),
        "naive": Form(_FreshPruned if _name == "prune" else _Fresh,
                      Capabilities(post_processed=True, finalize=_name == "prune"),
                      {"ridge": None, **_extra, **_naive_extra},
                      doc="prunes the total update once at the end of a run" if _name == "prune" else ""),
    }, options=OPTIONS, doc=f"{_name.upper()} post-processing on MEMIT, with Algorithm 1's error compensation (aligned)")

register_method("rlsedit", {
    "aligned": Form(_Woodbury, _EXACT, {"ridge": None, "mu2": None}),
}, options=OPTIONS, doc="RLSEdit (arXiv 2601.15686): recursive least squares with ridge and anchor")

register_method("memorize_latest", {
    "exact": Form(_Latest, Capabilities(removal="rebuild", exact=True, latest_only=True), {"ridge": None}),
    "nullspace": Form(_AlphaFresh, Capabilities(latest_only=True), _ALPHA_OPTS, hints=_NO_RIDGE),
}, options=OPTIONS, doc="controls of the paper's Table 1: only the newest batch in force")
