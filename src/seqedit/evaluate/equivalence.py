"""Sequential ≡ one-time editing, measured on a real model's keys and values (``seqedit verify-equivalence``).

Keys and values of ``n`` facts are read once on the unedited model (:mod:`seqedit.locate.frozen`);
then, per edited layer, the same ``(K, V)`` go through each method in steps of ``batch_size`` and in
one step (the pure :func:`seqedit.methods.equivalence`). The reported gap is
``‖W_SE − W_OTE‖_F / ‖W_OTE − W₀‖_F`` on the deployed weights, and for PRUNE/RECT also on
``W + Δ`` before post-processing (Algorithm 1's invariant). Aligned forms must be at round-off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..facts import Fact
from ..shared_data import wikitext_path
from ..locate.frozen import FrozenTargets, frozen_targets
from ..locate.stats import layer_stats
from ..locate.templates import context_templates
from ..methods import MethodSpec, equivalence
from ..models.presets import EditHParams
from ..progress import Phase, ProgressCallback, ProgressEvent, counter, emit

TOLERANCE = 1e-10


@dataclass(frozen=True)
class EquivalenceRow:
    """One method on one layer. ``gap`` is the number the claim is about: ``gap_raw`` for post-processed
    forms, else ``gap_deployed``. ``passed`` is ``None`` for control forms (no claim to check)."""

    method: str
    layer: int
    steps: int
    n_facts: int
    gap_deployed: float
    gap_raw: float | None
    gap: float
    matches_one_time: bool
    passed: bool | None

    def to_dict(self) -> dict:
        return asdict(self)


def equivalence_rows(
    spec: MethodSpec,
    targets: FrozenTargets,
    sigma0: dict[int, torch.Tensor],
    lam: float,
    W0: dict[int, torch.Tensor],
    batch_size: int,
    tol: float = TOLERANCE,
) -> list[EquivalenceRow]:
    """Per-layer SE-vs-OTE gaps of ``spec`` for frozen ``targets`` (``W0[ℓ]: [d_out, d_in]``,
    ``sigma0[ℓ]: [d_in, d_in]``), in steps of ``batch_size`` facts."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    V = targets.layer_values(W0)
    rows = []
    for layer in targets.layers:
        K = targets.keys[layer]
        batches = [(K[:, i : i + batch_size], V[layer][:, i : i + batch_size]) for i in range(0, targets.n, batch_size)]
        out = equivalence(spec, sigma0[layer], lam, W0[layer], batches)
        gap = out["gap_raw"] if spec.post_processed else out["gap_deployed"]
        rows.append(
            EquivalenceRow(
                method=spec.label,
                layer=layer,
                steps=out["steps"],
                n_facts=out["n_facts"],
                gap_deployed=out["gap_deployed"],
                gap_raw=out["gap_raw"],
                gap=gap,
                matches_one_time=spec.matches_one_time,
                passed=(gap < tol) if spec.matches_one_time else None,
            )
        )
    return rows


def verify_equivalence(
    loaded,
    specs: Sequence[MethodSpec],
    facts: Sequence[Fact],
    hp: EditHParams,
    batch_size: int,
    *,
    stats_corpus: str | None = None,
    tol: float = TOLERANCE,
    progress: ProgressCallback | None = None,
) -> list[EquivalenceRow]:
    """Read (K, V) of ``facts`` on ``loaded`` (which must be unedited) and measure every spec's gap.

    Σ₀ comes from the statistics cache (computed if missing); targets from the frozen-targets cache.
    """
    if not specs:
        raise ValueError("verify_equivalence needs at least one method")
    corpus = stats_corpus or wikitext_path("valid")
    stats = layer_stats(loaded, hp.layers, corpus, hp.stats_tokens, hp.stats_seq_len)
    templates = context_templates(loaded, hp.n_context_templates, hp.context_template_len, hp.template_seed)
    emit(progress, ProgressEvent(Phase.VALUES, total=len(facts), start=True))
    targets = frozen_targets(loaded, facts, templates, hp, progress=counter(progress, Phase.VALUES))
    W0 = {l: loaded.adapter.weight(l).to(torch.float64).cpu() for l in hp.layers}
    sigma0 = {l: stats[l].sigma0 for l in hp.layers}
    rows: list[EquivalenceRow] = []
    emit(progress, ProgressEvent(Phase.CONFIGS, total=len(specs), start=True))
    for spec in specs:
        rows += equivalence_rows(spec, targets, sigma0, hp.lam, W0, batch_size, tol)
        emit(progress, ProgressEvent(Phase.CONFIGS, advance=1, total=len(specs)))
    return rows


__all__ = ["EquivalenceRow", "TOLERANCE", "equivalence_rows", "verify_equivalence"]
