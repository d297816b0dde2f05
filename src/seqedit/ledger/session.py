"""The editor's side of a ledger: manifest checks, restore on reopen (snapshot + exact replay),
forget/undo steps, and ``verify``. Functions take the :class:`~seqedit.Editor` whose per-layer states,
float64 masters and base weights ``w0`` they read and update."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..methods import LayerMethodState, MethodSpec
from ..models.presets import EditHParams
from . import ops
from .store import FactRow, LedgerCorruptError, LedgerError, StepRecord

if TYPE_CHECKING:
    from ..editor import Editor
    from ..models.load import LoadedModel

__all__ = ["VerifyReport", "execute", "manifest", "reconcile", "restore", "snapshot_due", "verify"]

KV_DTYPES = ("float64", "float32")
# Hyperparameters that define the objective of the stored facts; the others only shape future steps.
_OBJECTIVE_HPARAMS = ("layers", "lam", "ridge")


def w0_digest(W: Tensor) -> str:
    return hashlib.sha256(W.detach().to(torch.float64).cpu().contiguous().numpy().tobytes()).hexdigest()


def manifest(editor: Editor, kv_dtype: str, snapshot_every: int) -> dict[str, Any]:
    from .. import __version__

    lm, hp = editor.loaded, editor.hparams
    return {
        "format": "seqedit-ledger",
        "seqedit_version": __version__,
        "created": time.time(),
        "base": {
            "name": lm.name,
            "fingerprint": lm.fingerprint,
            "cache_key": lm.cache_key,
            "dtype": str(lm.dtype).removeprefix("torch."),
            "w0_sha256": {str(l): w0_digest(lm.adapter.weight(l)) for l in hp.layers},
        },
        "method": editor.spec.to_dict(),
        "method_label": editor.spec.label,
        "hparams": hp.to_dict(),
        "stats_corpus": str(editor.stats_corpus) if editor.stats_corpus else None,
        "seeds": {"template_seed": hp.template_seed, "stats_seed": 0},
        "kv_dtype": kv_dtype,
        "snapshot_every": snapshot_every,
    }


def reconcile(man: dict, loaded: LoadedModel, spec: MethodSpec | None, hp: EditHParams | None,
              overrides: dict[str, Any], path: Any) -> tuple[MethodSpec, EditHParams]:
    """The method and hyperparameters to continue ledger ``man`` with; refuses another base model,
    method, or objective hyperparameters (``layers``, ``lam``, ``ridge``)."""
    base = man["base"]
    if loaded.fingerprint != base["fingerprint"]:
        raise LedgerError(
            f"ledger {path} was built on base model {base['name']!r} (fingerprint {base['fingerprint'][:16]}…); "
            f"the model given is {loaded.name!r} (fingerprint {loaded.fingerprint[:16]}…): load that base model"
        )
    stored_spec = MethodSpec(**man["method"])
    if spec is not None and spec != stored_spec:
        raise LedgerError(
            f"ledger {path} edits with {stored_spec.label} {man['method']}; refusing to continue it with "
            f"{spec.label} {spec.to_dict()} (omit method= to use the ledger's)"
        )
    stored_hp = EditHParams(**man["hparams"])
    wanted = (hp or stored_hp).override(**overrides)
    diff = [f"{k}: ledger {getattr(stored_hp, k)!r}, given {getattr(wanted, k)!r}"
            for k in _OBJECTIVE_HPARAMS if getattr(wanted, k) != getattr(stored_hp, k)]
    if diff:
        raise LedgerError(f"ledger {path} was built with other hyperparameters ({'; '.join(diff)})")
    for l in wanted.layers:
        if w0_digest(loaded.adapter.weight(l)) != base["w0_sha256"][str(l)]:
            raise LedgerError(
                f"layer {l} of the model differs from the ledger's base weights although the fingerprint "
                "matches: was this model object already edited? Load a fresh base model"
            )
    return stored_spec, wanted


def snapshot_due(editor: Editor, step: int) -> bool:
    # Methods without exact removal restore their previous state for undo, so they snapshot every step.
    return editor.capabilities.removal == "none" or step % editor.ledger_snapshot_every == 0


def snapshot_of(editor: Editor) -> dict[int, dict]:
    return {l: {"state": s.state_dict(), "master": editor.master[l]} for l, s in editor.states.items()}


def _load_state(editor: Editor, step: int) -> None:
    """States and masters as saved after ``step`` (``0``: the initial state)."""
    if step == 0:
        editor._init_states(editor.sigma0)
        return
    snap = editor.ledger.snapshot(step, editor.hparams.layers)
    for l, s in snap.items():
        editor.states[l] = LayerMethodState.from_state_dict(s["state"])
        editor.master[l] = s["master"].to(torch.float64)
        editor.loaded.adapter.set_weight(l, editor.master[l])


def _set(editor: Editor, layer: int, state: LayerMethodState, W: Tensor) -> None:
    editor.states[layer] = state
    editor.master[layer] = W
    editor.loaded.adapter.set_weight(layer, W)


def _run_columns(editor: Editor, add: list[FactRow], remove: list[FactRow],
                 rebuild_from: list[FactRow] | None = None) -> dict[int, float]:
    """Add the stored columns of ``add`` and remove those of ``remove`` in every layer (exact update),
    or, with ``rebuild_from`` (memorize_latest), re-solve those facts from the base weights.
    Returns ‖Δ_ℓ‖_F per layer."""
    L, spec, hp = editor.ledger, editor.spec, editor.hparams
    norms: dict[int, float] = {}
    if rebuild_from is not None:
        kv = L.kv(rebuild_from, hp.layers)
        for l in hp.layers:
            before = editor.master[l]
            _set(editor, l, *ops.one_time(spec, editor.sigma0[l], hp.lam, editor.w0[l], *kv[l]))
            norms[l] = float((editor.master[l] - before).norm())
        return norms
    if not add and not remove:
        return norms
    kv_a, kv_r = L.kv(add, hp.layers), L.kv(remove, hp.layers)
    for l in hp.layers:
        delta = ops.layer_update(editor.states[l], editor.master[l], *kv_a[l], *kv_r[l])
        editor._write(l, delta)
        norms[l] = float(delta.norm())
    return norms


def replay(editor: Editor, rec: StepRecord) -> None:
    """Redo committed step ``rec`` from the stored (k, v): no value optimisation, and the same float
    operations as when it was first run."""
    L, caps = editor.ledger, editor.capabilities
    add, remove = L.rows_added(rec.id), L.rows_removed(rec.id)
    if rec.kind == "apply":
        # memorize_latest's removal of the previous batch is implicit in its step()
        _run_columns(editor, add, remove if caps.removal == "system" else [])
    elif caps.removal == "none":
        _load_state(editor, rec.target - 1)
    elif caps.removal == "rebuild":
        _run_columns(editor, [], [], rebuild_from=L.in_force_after(rec.id))
    else:
        _run_columns(editor, add, remove)


def restore(editor: Editor) -> None:
    """Bring a freshly loaded base model to the ledger's last committed step: the newest snapshot, then
    an exact replay of the steps after it."""
    L = editor.ledger
    last = L.last_step
    snaps = L.snapshot_steps()
    start = snaps[-1] if snaps else 0
    if start:  # else the editor's fresh states are the initial state
        _load_state(editor, start)
    for s in range(start + 1, last + 1):
        rec = L.step(s)
        if editor.capabilities.removal == "none" and rec.kind != "apply" and rec.target - 1 not in (0, *snaps):
            raise LedgerCorruptError(f"ledger {L.path}: no snapshot to replay undo step {s}")
        replay(editor, rec)


def execute(editor: Editor, plan: ops.Plan) -> StepRecord:
    """Run and commit a forget or undo ``plan`` (all-or-nothing)."""
    L = editor.ledger
    caps = editor.capabilities
    sec: dict[str, float] = {}
    with editor._transaction():
        t = time.perf_counter()
        if caps.removal == "none":  # undo of the latest step: the state saved before it
            _load_state(editor, plan.target - 1)
            norms: dict[int, float] = {}
        else:
            rebuild = None
            if caps.removal == "rebuild":  # the facts in force afterwards, in the order replay reads them
                leaving = {r.row for r in plan.remove}
                rebuild = [r for r in L.in_force() if r.row not in leaving] + plan.readd
            norms = _run_columns(editor, plan.readd, plan.remove, rebuild)
        sec["solve"] = time.perf_counter() - t
        t = time.perf_counter()
        step = L.last_step + 1
        info = {"update_norms": {str(k): v for k, v in norms.items()}, "seconds": sec}
        rec = L.commit(plan.kind, readd=plan.readd, remove=plan.remove, target=plan.target, info=info,
                       snapshot=snapshot_of(editor) if snapshot_due(editor, step) else None)
        sec["commit"] = time.perf_counter() - t
    return rec


# ------------------------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """``layers[ℓ]``: ``rel_error`` = ‖W_live − W_OTE‖_F / ‖W_OTE − W₀‖_F (``None`` for methods whose
    weights are not a one-time solution) and ``deployed_matches`` (the model holds the float64 master
    cast to its dtype). ``bad_files``: (name, problem). ``ok`` when all pass with ``rel_error ≤ tol``."""

    ok: bool
    tol: float
    method: str
    exact: bool
    n_facts: int
    steps: int
    files_checked: int
    bad_files: list[tuple[str, str]]
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = {str(k): v for k, v in self.layers.items()}
        d["bad_files"] = [list(b) for b in self.bad_files]
        return d


def verify(editor: Editor, tol: float = 1e-8) -> VerifyReport:
    """Re-solve the one-time problem from the stored (k, v) of the facts in force and the base
    weights, compare with the live weights per layer, and check every file's checksum."""
    t0 = time.perf_counter()
    L, spec, hp = editor.ledger, editor.spec, editor.hparams
    editor._ensure_state()
    bad = L.check_files()
    rows = L.in_force()
    caps = editor.capabilities
    kv = L.kv(rows, hp.layers) if caps.exact and not bad else {}
    layers: dict[int, dict[str, Any]] = {}
    for l in hp.layers:
        W = editor.master[l]
        entry: dict[str, Any] = {
            "deployed_matches": bool(torch.equal(editor.loaded.adapter.weight(l), W.to(editor.loaded.dtype)))
        }
        if kv:
            _, W_ote = ops.one_time(spec, editor.sigma0[l], hp.lam, editor.w0[l], *kv[l])
            scale = float((W_ote - editor.w0[l]).norm()) or float(editor.w0[l].norm())
            entry["rel_error"] = float((W - W_ote).norm()) / scale
        else:
            entry["rel_error"] = None
        layers[l] = entry
    ok = not bad and all(e["deployed_matches"] and (e["rel_error"] is None or e["rel_error"] <= tol) for e in layers.values())
    if caps.exact and bad:
        ok = False
    return VerifyReport(ok, tol, spec.label, caps.exact, len(rows), L.last_step, L.file_count(), bad, layers,
                        time.perf_counter() - t0)
