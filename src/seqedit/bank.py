"""The layer bank: per edited layer, the method state, the base weight W₀, the float64 master and Σ₀.

It is the one owner of the edited weights. Every change to a layer goes through the bank, which
adds ``Δ`` to the float64 master ``W_ℓ`` (so repeated small updates are not rounded away by the model's
dtype) and writes the master, cast, into the model. The linear algebra of a layer on keys
``K: [d_in, n]`` and targets ``V: [d_out, n]`` (absolute FFN-out values, residuals ``R = V − W K`` taken on
the current master) is here too: a method step, an exact add/remove update, a one-time solve.

``transaction()`` makes a multi-layer change all-or-nothing; ``snapshot()`` / ``load()`` move a bank's
whole state in and out (the ledger stores snapshots). The bank knows nothing of facts, prompts or
ledgers: callers hand it tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor

from .errors import PlacementError
from .methods import Capabilities, LayerMethodState, MethodSpec
from .models.placement import HOST, free_bytes

__all__ = ["LayerBank", "WeightIO", "default_solve_device"]


class WeightIO(Protocol):
    """Where the edited matrices live: ``weight(ℓ)`` / ``set_weight(ℓ, W)`` in math layout ``[d_out, d_in]``
    (:class:`~seqedit.models.arch.ModelAdapter` is one). An implementation may also have ``device(ℓ)``,
    where layer ℓ computes (the default solve device); without it the weight's own device is used."""

    def weight(self, layer: int) -> Tensor: ...

    def set_weight(self, layer: int, w_math: Tensor) -> None: ...


def default_solve_device(weights: WeightIO, layer: int) -> torch.device:
    """The accelerator layer ``layer`` computes on, else the host: the float64 state of a layer sits next
    to its weight when that is on a GPU, and on the CPU otherwise (CPU or offloaded weights)."""
    where = getattr(weights, "device", None)
    dev = torch.device(where(layer)) if where is not None else weights.weight(layer).device
    return dev if dev.type not in (HOST.type, "meta") else HOST


class LayerBank:
    """The edited layers of one model under one method form.

    ``LayerBank(weights, spec, layers, lam)``; call :meth:`init` with ``Σ₀`` per layer (``[d_in, d_in]``)
    before any change; ``w0`` is read from ``weights`` at the first ``init`` and must be the base weight.
    ``keep_sigma0`` keeps Σ₀ after ``init`` (needed to re-initialise, rebuild or verify; a ledger keeps
    it), otherwise it is dropped to save ``d_in²`` float64 per layer.

    ``solve_device``: where each layer's float64 state (normal-equation system, W₀, master, Σ₀) lives and
    is solved; default :func:`default_solve_device` per layer (the layer's GPU, else the CPU). It costs
    ``d_in²`` × 8 bytes for A plus as much for its factor per layer (~3.3 GB at d_in = 14,336), with
    ``d_out·d_in`` × 8 bytes each for W₀ and the master: pass ``"cpu"`` on a small GPU.
    """

    def __init__(self, weights: WeightIO, spec: MethodSpec, layers: tuple[int, ...], lam: float, *,
                 keep_sigma0: bool = False, solve_device: torch.device | str | None = None) -> None:
        self.weights = weights
        self.solve_device = {l: torch.device(solve_device) if solve_device is not None
                             else default_solve_device(weights, l) for l in layers}
        self.spec = spec
        self.layers = tuple(layers)
        self.lam0 = float(lam)  # the initial state's λ; set_lam moves self.lam (a λ schedule)
        self.lam = self.lam0
        self.keep_sigma0 = keep_sigma0
        self.states: dict[int, LayerMethodState] = {}
        self.w0: dict[int, Tensor] = {}
        self.master: dict[int, Tensor] = {}
        self.sigma0: dict[int, Tensor] = {}

    @property
    def ready(self) -> bool:
        """True once :meth:`init` has built the states."""
        return bool(self.states)

    @property
    def capabilities(self) -> Capabilities:
        return self.spec.capabilities

    @property
    def systems(self) -> dict[int, Any]:
        """The normal-equation system of each layer, where the form keeps one."""
        return {l: s.system for l, s in self.states.items() if s.system is not None}

    # ------------------------------------------------------------------ state
    def init(self, sigma0: dict[int, Tensor] | None = None) -> None:
        """Fresh method states from ``sigma0`` (default: the kept Σ₀) on the base weights, at the initial
        λ; masters and the model's layers go back to ``W₀``."""
        if sigma0 is None:
            if not self.sigma0:
                raise RuntimeError("LayerBank.init needs Σ₀ (this bank did not keep it)")
            sigma0 = self.sigma0
        missing = [l for l in self.layers if l not in sigma0]
        if missing:
            raise ValueError(f"Σ₀ is missing for edited layers {missing}")
        self.check_fit()
        self.lam = self.lam0
        sigma0 = {l: self._on(l, sigma0[l]) for l in self.layers}
        for layer in self.layers:
            if layer not in self.w0:
                self.w0[layer] = self._on(layer, self.weights.weight(layer)).clone()
            self.states[layer] = self.spec.init_layer(sigma0[layer], self.lam, self.w0[layer])
            self._set_master(layer, self.w0[layer].clone())
        self.sigma0 = sigma0 if self.keep_sigma0 else {}

    def state_bytes(self) -> dict[torch.device, int]:
        """Bytes of float64 state per solve device, at least: per layer A and its factor (2·d_in²·8), Σ₀
        while it is moved there (d_in²·8), W₀ and the master (2·d_out·d_in·8)."""
        need: dict[torch.device, int] = {}
        for l in self.layers:
            d_out, d_in = self.weights.weight(l).shape
            dev = self.solve_device[l]
            need[dev] = need.get(dev, 0) + 8 * (3 * d_in * d_in + 2 * d_out * d_in)
        return need

    def check_fit(self) -> None:
        """Refuse (``PlacementError``), before anything is allocated, a state that cannot fit on its
        accelerator; the host is not checked (it pages rather than fails)."""
        for dev, need in self.state_bytes().items():
            free = None if dev.type == HOST.type else free_bytes(dev)
            if free is not None and need > free:
                layers = [l for l in self.layers if self.solve_device[l] == dev]
                raise PlacementError(
                    f"the float64 state of layers {layers} needs {need / 2**30:.1f} GiB on {dev}, "
                    f"{free / 2**30:.1f} GiB are free: pass solve_device='cpu' (the state then lives in host "
                    "memory and the solves run there) or edit fewer layers"
                )

    def _on(self, layer: int, X: Tensor | None) -> Tensor | None:
        """``X`` as float64 on ``layer``'s solve device (no copy when it is already)."""
        return None if X is None else X.to(device=self.solve_device[layer], dtype=torch.float64)

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """``{layer: {"state": state_dict, "master": W}}``; tensors are shared, never modified later."""
        return {l: {"state": s.state_dict(), "master": self.master[l]} for l, s in self.states.items()}

    def load(self, snapshot: dict[int, dict[str, Any]] | None, lam: float | None = None) -> None:
        """Install a :meth:`snapshot` taken at preservation weight ``lam`` (default: the initial λ; a
        λ schedule's ledger records each step's) or, ``None``, the initial state from the kept Σ₀."""
        if snapshot is None:
            self.init()
            return
        self.lam = self.lam0 if lam is None else float(lam)
        for layer, s in snapshot.items():
            self.states[layer] = LayerMethodState.from_state_dict(s["state"], device=self.solve_device[layer])
            self._set_master(layer, self._on(layer, s["master"]))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All-or-nothing for a multi-layer change: a failure part-way restores every layer's method
        state, master, deployed weight and λ. States share their tensors with the snapshot (they replace
        tensors, never modify them), so entering costs no copies."""
        saved_states = {l: s.state_dict() for l, s in self.states.items()}
        saved_master, saved_lam = dict(self.master), self.lam
        try:
            yield
        except BaseException:
            self.lam = saved_lam  # set_lam inside it
            self.states = {l: LayerMethodState.from_state_dict(d) for l, d in saved_states.items()}
            for layer, W in saved_master.items():
                self._set_master(layer, W)
            raise

    def write(self, layer: int, delta: Tensor) -> None:
        """``W_ℓ ← W_ℓ + Δ`` (float64) and deploy it."""
        self._set_master(layer, self.master[layer] + delta)

    def replace(self, layer: int, state: LayerMethodState, W: Tensor) -> None:
        """Install ``state`` and weight ``W`` for ``layer`` (a re-solve from the base weights)."""
        self.states[layer] = state
        self._set_master(layer, W)

    def _set_master(self, layer: int, W: Tensor) -> None:
        self.master[layer] = W
        self.weights.set_weight(layer, W)

    def delta(self, layer: int) -> Tensor:
        """``W_ℓ − W₀,ℓ: [d_out, d_in]`` (float64): everything written into ``layer``."""
        return self.master[layer] - self.w0[layer]

    def deployed_matches(self, layer: int) -> bool:
        """The model holds the float64 master cast to its own dtype, bit for bit."""
        live = self.weights.weight(layer)
        return bool(torch.equal(live, self.master[layer].to(live.device, live.dtype)))

    # ------------------------------------------------------------------ linear algebra of one layer
    def step(self, layer: int, K: Tensor, R: Tensor) -> Tensor:
        """The method's update for keys ``K: [d_in, n]`` and residuals ``R: [d_out, n]`` on the current
        master (post-processing included); the state advances, nothing is written."""
        return self.states[layer].step(K, R, self.master[layer]).applied

    def update(self, layer: int, K_add: Tensor | None, V_add: Tensor | None,
               K_rem: Tensor | None = None, V_rem: Tensor | None = None) -> Tensor:
        """``Δ: [d_out, d_in]`` that adds ``(K_add, V_add)`` and removes ``(K_rem, V_rem)`` (float64 absolute
        targets) on the current master; nothing is written.

        Without removals this is the method's own ``step`` (post-processing, memorize_latest's implicit
        removal); with removals the exact update of the layer's system (forms with ``removal="system"``).
        """
        W = self.master[layer]
        K_add, V_add, K_rem, V_rem = (self._on(layer, X) for X in (K_add, V_add, K_rem, V_rem))
        if K_rem is None or K_rem.shape[1] == 0:
            return self.states[layer].step(K_add, V_add - W @ K_add, W).applied
        if self.capabilities.removal != "system":
            raise ValueError(f"{self.spec.label} has no exact removal of constraints")
        R_add = None if K_add is None or K_add.shape[1] == 0 else V_add - W @ K_add
        return self.states[layer].system.update(None if R_add is None else K_add, R_add, K_rem, V_rem - W @ K_rem)

    def one_time(self, layer: int, K: Tensor | None, V: Tensor | None) -> tuple[LayerMethodState, Tensor]:
        """A fresh state solving all of ``(K: [d_in, n], V: [d_out, n])`` in one step from ``W₀`` (kept
        Σ₀), and the resulting weight (``W₀`` itself when there is nothing to solve)."""
        if not self.sigma0:
            raise RuntimeError("LayerBank.one_time needs the kept Σ₀ (keep_sigma0=True)")
        W0 = self.w0[layer]
        state = self.spec.init_layer(self.sigma0[layer], self.lam, W0)
        K, V = self._on(layer, K), self._on(layer, V)
        if K is None or K.shape[1] == 0:
            return state, W0.clone()
        return state, W0 + state.step(K, V - W0 @ K, W0).applied

    def set_lam(self, lam: float) -> dict[int, Tensor]:
        """Re-form every layer's system with preservation weight ``lam`` (``A' = A + (λ' − λ)Σ₀``, kept
        Σ₀ needed) and write the exact move of its optimum: afterwards each layer holds the one-time
        solution of the same constraints with ``lam``. All layers or none; returns the updates written.
        ``ValueError`` for forms without an exact re-formation (:meth:`LayerMethodState.relam`)."""
        if not self.sigma0:
            raise RuntimeError("LayerBank.set_lam needs the kept Σ₀ (keep_sigma0=True)")
        out: dict[int, Tensor] = {}
        if float(lam) == self.lam:
            return out
        with self.transaction():
            for layer, state in self.states.items():
                out[layer] = state.relam(lam, self.sigma0[layer], self.master[layer], self.w0[layer])
                self.write(layer, out[layer])
        self.lam = float(lam)
        return out

    def finalize(self) -> dict[int, Tensor]:
        """Write the end-of-run update of each layer (forms with ``Capabilities.finalize``); returns the
        updates written (empty for other forms)."""
        out: dict[int, Tensor] = {}
        if not self.capabilities.finalize:
            return out
        with self.transaction():
            for layer, state in self.states.items():
                delta = state.finalize(self.master[layer])
                if delta is not None:
                    self.write(layer, delta)
                    out[layer] = delta
        return out
