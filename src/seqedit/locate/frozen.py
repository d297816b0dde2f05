"""Keys and target values read once on the unedited model ("frozen" targets), cached on disk.

Two uses need the same (K, V) for every run:

- the equivalence check (``seqedit verify-equivalence``): with keys and values held fixed, a method's
  sequential steps must sum to its one-time solution, layer by layer;
- benchmark protocols that compare many methods on one set of targets (the paper's OTE computes every
  value on the original model; reusing them for SE isolates the solver from value optimisation).

Per edited layer ``ℓ_i`` (``i = 0..L−1``) the frozen constraint is ``W_ℓ k = v`` with
``V_ℓ = W₀,ℓ K_ℓ + (Z − H₀)/L``: the z-layer residual ``Z − H₀`` shared equally over the L layers, so
the shares sum to the whole residual when every layer meets its constraint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..facts import Fact
from ..models.presets import EditHParams
from ..paths import build_once, cache_dir
from .keys import ContextRows, read_keys
from .values import ValueResult, compute_values, delta_budget

FORMAT = 1


@dataclass
class FrozenTargets:
    """Targets of ``n`` facts on the unedited model (all float64).

    ``keys[ℓ]: [d_in, n]`` (context-averaged FFN-out inputs, one column per fact: with
    ``hp.format_columns`` an edit reads one key per prompt format instead, see ``pipeline.column_targets``;
    these keys serve the equivalence check, which edits bare rows), ``z, h0: [d_model, n]`` (optimised and
    original z-layer states), ``steps``/``nll``: per-fact value-optimisation diagnostics.
    """

    fact_ids: list[str]
    layers: tuple[int, ...]
    keys: dict[int, torch.Tensor]
    z: torch.Tensor
    h0: torch.Tensor
    steps: list[int]
    nll: list[float]

    @property
    def n(self) -> int:
        return self.z.shape[1]

    def layer_values(self, W0: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``V_ℓ = W₀,ℓ K_ℓ + (Z − H₀)/L: [d_out, n]`` for ``W0[ℓ]: [d_out, d_in]``."""
        share = (self.z - self.h0) / len(self.layers)
        return {l: W0[l].to(torch.float64) @ self.keys[l] + share for l in self.layers}

    def value_result(self, lo: int = 0, hi: int | None = None) -> ValueResult:
        """The facts ``lo:hi`` as a :class:`ValueResult` for ``Editor.apply(facts, values=...)``."""
        hi = self.n if hi is None else hi
        return ValueResult(
            z=self.z[:, lo:hi].contiguous(),
            h0=self.h0[:, lo:hi].contiguous(),
            steps=self.steps[lo:hi],
            loss=self.nll[lo:hi],
            nll=self.nll[lo:hi],
        )

    # ---------------------------------------------------------------- storage
    def save(self, path: Path) -> None:
        tensors = {f"keys.{l}": k.contiguous() for l, k in self.keys.items()}
        tensors |= {"z": self.z.contiguous(), "h0": self.h0.contiguous()}
        meta = {
            "format": str(FORMAT),
            "fact_ids": json.dumps(self.fact_ids),
            "layers": json.dumps(list(self.layers)),
            "steps": json.dumps(self.steps),
            "nll": json.dumps(self.nll),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: Path) -> FrozenTargets:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != str(FORMAT):
            raise ValueError(f"{path}: not a seqedit frozen-targets file of format {FORMAT}")
        t = load_file(str(path))
        layers = tuple(json.loads(meta["layers"]))
        return cls(
            fact_ids=json.loads(meta["fact_ids"]),
            layers=layers,
            keys={l: t[f"keys.{l}"] for l in layers},
            z=t["z"],
            h0=t["h0"],
            steps=json.loads(meta["steps"]),
            nll=json.loads(meta["nll"]),
        )


def _cache_key(loaded, facts: Sequence[Fact], templates: Sequence[str], hp: EditHParams,
               prompt_format: str = "bare") -> str:
    payload = {
        "format": FORMAT,
        "model": loaded.cache_key,
        "facts": [[f.prompt, f.subject, f.target] for f in facts],
        "templates": list(templates),
        "hparams": hp.to_dict(),
    }
    if prompt_format != "bare":  # absent for bare rows, so earlier caches stay valid
        payload["prompt_format"] = prompt_format
        # δ's budget with several formats grew by √F (values.delta_budget): older targets are not these
        payload["delta_budget"] = delta_budget(hp, prompt_format)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def frozen_targets(
    loaded,
    facts: Sequence[Fact],
    templates: Sequence[str],
    hp: EditHParams,
    *,
    cache: bool = True,
    progress: Callable[[int], None] | None = None,
    prompt_format: str = "bare",
) -> FrozenTargets:
    """Keys at ``hp.layers`` and optimised values for ``facts`` on the model as it is now (call it on
    the unedited model). Cached under ``$SEQEDIT_CACHE/frozen`` keyed by model, facts, templates and
    hyperparameters (and the prompt format of the rows, ``locate/chat.py``), so every method and mode
    of a comparison reuses one value optimisation."""
    if not facts:
        raise ValueError("frozen_targets needs at least one fact")
    path = cache_dir("frozen") / f"{_cache_key(loaded, facts, templates, hp, prompt_format)}.safetensors"
    if not cache:
        return _optimise(loaded, facts, templates, hp, progress, prompt_format)

    def optimise_and_save() -> FrozenTargets:
        out = _optimise(loaded, facts, templates, hp, progress, prompt_format)
        out.save(path)
        return out

    # a concurrent run of the same comparison optimises once, the other waits and loads
    return build_once(path, lambda: FrozenTargets.load(path) if path.exists() else None, optimise_and_save)


def _optimise(loaded, facts: Sequence[Fact], templates: Sequence[str], hp: EditHParams,
              progress: Callable[[int], None] | None, prompt_format: str) -> FrozenTargets:
    ctx = ContextRows.build(loaded.tokenizer, facts, templates, prompt_format)
    keys = read_keys(loaded, ctx, hp.layers, batch_rows=hp.key_batch_rows).keys
    values = compute_values(loaded, facts, templates, hp, progress=progress, prompt_format=prompt_format)
    return FrozenTargets(
        fact_ids=[f.id or f"#{i}" for i, f in enumerate(facts)],
        layers=tuple(hp.layers),
        keys={l: keys[l].to(torch.float64).contiguous() for l in hp.layers},
        z=values.z,
        h0=values.h0,
        steps=list(values.steps),
        nll=list(values.nll),
    )


__all__ = ["FrozenTargets", "frozen_targets"]
