"""A ledger's manifest: what it was built on (base model, method, hyperparameters, storage settings),
and the checks that refuse to continue it with anything else."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
from torch import Tensor

from ..methods import MethodSpec, parse_method
from ..models.load import LoadedModel, fingerprint_model
from ..models.presets import EditHParams
from ..version import __version__
from .journal import LedgerError
from .store import Ledger

__all__ = ["KV_DTYPES", "build_manifest", "reconcile_prompt_format", "recorded_base", "check_base", "check_storage", "reconcile", "reconcile_settings",
           "requested_method", "stored_hparams", "w0_digest"]

KV_DTYPES = ("float64", "float32")
# Hyperparameters that define the objective of the stored facts; the others only shape future steps.
# (The ridge ρ, once an hyperparameter, is a method option: the stored method spec carries it.)
# A λ schedule (lam_growth) is part of the objective: the facts in force are solved under λ_N.
_OBJECTIVE_HPARAMS = ("layers", "lam", "lam_growth")


def w0_digest(W: Tensor) -> str:
    return hashlib.sha256(W.detach().to(torch.float64).cpu().contiguous().numpy().tobytes()).hexdigest()


def recorded_base(path: Any) -> dict[str, Any]:
    """The base model a ledger records (``name``, ``fingerprint``, ``dtype``, …), read without a model;
    ``LedgerError`` when ``path`` holds no ledger."""
    with Ledger(path) as L:
        return dict(L.manifest["base"])


def check_storage(kv_dtype: str, snapshot_every: int) -> None:
    """Validate a new ledger's storage settings (``ValueError`` naming the bad one)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
        raise ValueError(f"snapshot_every must be an int ≥ 1, got {snapshot_every!r}")


def check_base(loaded: LoadedModel, path: Any) -> None:
    """Refuse to start a ledger on a model object whose weights are no longer those it was loaded (and
    fingerprinted) with: the ledger would record edited weights as its base W₀ under the base's
    fingerprint, and could never be reopened on the real base model."""
    if fingerprint_model(loaded.model) != loaded.fingerprint:
        raise LedgerError(
            f"cannot start ledger {path}: the weights of {loaded.name!r} differ from those it was loaded with "
            "(was this model object already edited?); load a fresh base model for a new ledger"
        )


def build_manifest(loaded: LoadedModel, spec: MethodSpec, hp: EditHParams, stats_corpus: Any,
                   kv_dtype: str, snapshot_every: int, prompt_format: str = "bare") -> dict[str, Any]:
    """The manifest of a new ledger on ``loaded``'s base weights (read now: they must be unedited)."""
    return {
        "prompt_format": prompt_format,
        "format": "seqedit-ledger",
        "seqedit_version": __version__,
        "created": time.time(),
        "base": {
            "name": loaded.name,
            "fingerprint": loaded.fingerprint,
            "cache_key": loaded.cache_key,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "w0_sha256": {str(l): w0_digest(loaded.adapter.weight(l)) for l in hp.layers},
        },
        "method": spec.to_dict(),
        "method_label": spec.label,
        "hparams": hp.to_dict(),
        "stats_corpus": str(stats_corpus) if stats_corpus else None,
        "seeds": {"template_seed": hp.template_seed, "stats_seed": 0},
        "kv_dtype": kv_dtype,
        "snapshot_every": snapshot_every,
    }


def reconcile_prompt_format(man: dict, requested: str | None, mix: bool, path: Any) -> str:
    """The prompt format to continue ledger ``man`` with: the recorded one (``"bare"`` for ledgers
    written before formats were recorded) unless ``requested``; another one is refused unless ``mix``
    (each step records its own format, ``StepRecord.info["prompt_format"]``)."""
    stored = man.get("prompt_format", "bare")
    if requested is None or requested == stored:
        return stored
    if not mix:
        raise LedgerError(
            f"ledger {path} edits with prompt format {stored!r}; refusing to mix in {requested!r} steps "
            "(pass mix_prompt_formats=True, CLI --mix-prompt-formats, to allow it)"
        )
    return requested


def stored_hparams(man: dict) -> EditHParams:
    """The manifest's hyperparameters (a ``ridge`` stored by older versions lives in the method spec)."""
    hp = dict(man["hparams"])
    hp.pop("ridge", None)
    return EditHParams.from_dict(hp)


def reconcile(man: dict, loaded: LoadedModel, spec: MethodSpec | None, hp: EditHParams | None,
              overrides: dict[str, Any], path: Any) -> tuple[MethodSpec, EditHParams]:
    """The method and hyperparameters to continue ledger ``man`` with; refuses another base model,
    method, or objective hyperparameters (``layers``, ``lam``, ``lam_growth``)."""
    base = man["base"]
    if loaded.fingerprint != base["fingerprint"]:
        raise LedgerError(
            f"ledger {path} was built on base model {base['name']!r} (fingerprint {base['fingerprint'][:16]}…); "
            f"the model given is {loaded.name!r} (fingerprint {loaded.fingerprint[:16]}…): load that base model"
        )
    stored_spec, wanted = reconcile_settings(man, spec, hp, overrides, path)
    for l in wanted.layers:
        if w0_digest(loaded.adapter.weight(l)) != base["w0_sha256"][str(l)]:
            raise LedgerError(
                f"layer {l} of the model differs from the ledger's base weights although the fingerprint "
                "matches: was this model object already edited? Load a fresh base model"
            )
    return stored_spec, wanted


def requested_method(man: dict, method: str | None, alignment: str | None, options: dict[str, Any]) -> MethodSpec | None:
    """The method asked of an existing ledger: ``None`` (the stored one) unless a method, an alignment or
    options are given; an alignment or options without a method refine the stored method."""
    if method is None and (options or alignment):
        method, alignment = man["method"]["name"], alignment or man["method"]["alignment"]
    return None if method is None else parse_method(method, alignment, **options)


def reconcile_settings(man: dict, spec: MethodSpec | None, hp: EditHParams | None, overrides: dict[str, Any],
                       path: Any) -> tuple[MethodSpec, EditHParams]:
    """The part of :func:`reconcile` that needs no model (so a CLI can refuse before loading one): the
    stored method, and the hyperparameters to continue with; refuses another method or objective."""
    stored_spec = MethodSpec.from_dict(man["method"])
    if spec is not None and spec != stored_spec:
        raise LedgerError(
            f"ledger {path} edits with {stored_spec.label} {stored_spec.to_dict()}; refusing to continue it with "
            f"{spec.label} {spec.to_dict()} (omit method= to use the ledger's)"
        )
    stored_hp = stored_hparams(man)
    wanted = (hp or stored_hp).override(**overrides)
    diff = [f"{k}: ledger {getattr(stored_hp, k)!r}, given {getattr(wanted, k)!r}"
            for k in _OBJECTIVE_HPARAMS if getattr(wanted, k) != getattr(stored_hp, k)]
    if diff:
        raise LedgerError(f"ledger {path} was built with other hyperparameters ({'; '.join(diff)})")
    return stored_spec, wanted
