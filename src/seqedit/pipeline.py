"""One editing step on a model: optimise target values, then per edited layer read keys on the current
model, solve, write (MEMIT's locate → solve → apply), timed phase by phase.

The layers are edited in ascending order and each is written before the next reads its keys, so an
upper layer sees the lower ones already edited (``Δ_i`` explains its share ``R_i = (Z − H_i) / (L − i)``
of what is left); the loop is :func:`seqedit.step_engine.solve_layers`, with the keys and residuals read
on the model as its column source. The whole step is one bank transaction: a failure leaves every
layer as it was.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from .bank import LayerBank
from .facts import Fact
from .ledger.plan import Plan
from .ledger.session import LedgerSession
from .ledger.store import StepRecord
from .locate.chat import formats
from .locate.keys import ContextRows, KeyReader
from .locate.values import ValueResult, clean_h0_norms, compute_values
from .models.load import LoadedModel
from .models.presets import EditHParams
from .progress import Phase, ProgressCallback, ProgressEvent, counter, emit
from .step_engine import solve_layers
from .steps import StepReport

__all__ = ["column_targets", "edit_step", "step_rows"]


def step_rows(tokenizer, facts: Sequence[Fact], templates: Sequence[str], prompt_format: str,
              split: bool) -> tuple[ContextRows, ContextRows]:
    """The rows keys are averaged over (``templates`` × the format's rows) and each key column's primary
    row (template ``"{}"``: where ``H`` is read), for ``facts`` in ``prompt_format`` (``split``: one key
    column per format)."""
    ctx = ContextRows.build(tokenizer, facts, templates, prompt_format, split)
    primary = ContextRows.build(tokenizer, facts, ["{}"], prompt_format if split else formats(prompt_format)[0], split)
    return ctx, primary


def column_targets(z: torch.Tensor, H: torch.Tensor, columns: int) -> torch.Tensor:
    """Targets ``[d_out, n·c]`` of c key columns per fact from the facts' values ``z: [d_out, n]`` (read on
    each fact's first column) and the z-layer states ``H: [d_out, n·c]`` of every column's primary row
    before the step: column g of fact f aims at ``H[:, f·c+g] + (z_f − H[:, f·c])``, the fact's one δ
    added in that column's own context (as the value optimisation added it)."""
    if columns == 1:
        return z
    n = z.shape[1]
    Hc = H.view(H.shape[0], n, columns)
    return (Hc + (z - Hc[:, :, 0])[:, :, None]).reshape(H.shape[0], n * columns)


def edit_step(loaded: LoadedModel, bank: LayerBank, session: LedgerSession | None, hp: EditHParams,
              facts: Sequence[Fact], get_templates: Callable[[], list[str]], values: ValueResult | None,
              plan: Plan | None, next_id: int, progress: ProgressCallback | None,
              prompt_format: str = "bare", lam: float | None = None) -> tuple[StepReport, StepRecord | None]:
    """Edit ``facts`` (ids assigned, ``plan`` made when ``session`` journals the bank) into ``bank``'s
    layers; ``values`` are precomputed targets or ``None`` to optimise them now. Keys and values
    average over the rows of ``prompt_format`` (``locate/chat.py``) into one key column per fact, or
    with ``hp.format_columns`` one per format (:func:`column_targets`); the residual is taken on each
    column's primary row. Returns the report (``id`` = the committed record's, else ``next_id``) and
    the journal record (its info records the prompt format). ``lam`` (a λ schedule's, for the facts in
    force after the step) re-forms the bank first, so the values are optimised on the re-formed model."""
    tok = loaded.tokenizer
    sec: dict[str, float] = {}
    t = time.perf_counter()
    templates = get_templates()
    split = hp.format_columns and len(formats(prompt_format)) > 1
    ctx, primary = step_rows(tok, facts, templates, prompt_format, split)  # validates every subject before any work
    sec["templates"] = time.perf_counter() - t

    # one bank transaction from the re-formation to the commit: a failure leaves every layer (and λ) as
    # it was; nothing after the commit is inside, so a committed step is never taken back
    with bank.transaction():
        if lam is not None:  # a λ schedule: re-form for the facts in force after the step, then edit
            bank.set_lam(lam)
        t = time.perf_counter()
        value_work: dict[str, float] = {}
        if values is None:
            emit(progress, ProgressEvent(Phase.VALUES, total=len(facts), start=True))
            ref = (clean_h0_norms(loaded, facts, hp, {l: bank.w0[l] for l in hp.layers}, prompt_format)
                   if hp.budget_anchor == "clean" else None)
            values = compute_values(loaded, facts, templates, hp, progress=counter(progress, Phase.VALUES),
                                    prompt_format=prompt_format, h0_norm_ref=ref)
            value_work = {
                "mean_delta_norm": sum(values.delta_norms) / len(facts),
                "mean_budget_norm": sum(values.budget_norms) / len(facts),
                "mean_h0_norm": float(values.h0.norm(dim=0).mean()),
                "clamped_fraction": values.clamped_fraction(),
                "iterations": values.iterations,
                "suffix_tokens": values.row_tokens,
                "padded_tokens": values.padded_tokens,
                "scored_positions": values.head_positions,
                "delta_gflop": values.delta_flops(loaded, hp.z_layer) / 1e9,
            }
        elif values.z.shape[1] != len(facts):
            raise ValueError(f"values hold {values.z.shape[1]} facts, the step has {len(facts)}")
        sec["values"] = time.perf_counter() - t

        residual_norms: dict[int, float] = {}
        # layers are edited in ascending order, so once layer ℓ is read the blocks below it are final
        ctx_reader = KeyReader(loaded, ctx, hp.key_batch_rows)
        primary_reader = KeyReader(loaded, primary, hp.key_batch_rows)
        removed = session.removed_kv(plan) if plan is not None else None
        record: StepRecord | None = None
        targets: list[torch.Tensor] = []  # Z, fixed by the first layer's reading of H

        def columns(i: int, layer: int):
            K = ctx_reader.read([layer], frozen_below=layer).keys[layer]
            H = primary_reader.read([], z_layer=hp.z_layer, frozen_below=layer).z_hidden
            if i == 0:
                targets.append(column_targets(values.z, H, ctx.columns))
            resid = targets[0] - H
            residual_norms[layer] = float(resid.norm())
            return K, resid / hp.residual_divisor(i), None

        done = solve_layers(bank, session, hp.layers, columns, removed=removed, progress=progress)
        sec.update(done.seconds)
        Z = targets[0]
        if plan is not None:
            t = time.perf_counter()
            record = session.commit_apply(facts, plan, done.constraints, done.update_norms, hp.to_dict(),
                                          prompt_format=prompt_format, targets=Z)
            sec["commit"] = time.perf_counter() - t
    t = time.perf_counter()
    H = primary_reader.read([], z_layer=hp.z_layer).z_hidden
    final = float((Z - H).norm())
    sec["keys"] += time.perf_counter() - t
    sec["total"] = sum(sec.values())
    report = StepReport(
        id=record.id if record is not None else next_id,
        method=bank.spec.label,
        facts=list(facts),
        seconds=sec,
        residual_norms=residual_norms,
        final_residual=final,
        target_norm=residual_norms[hp.layers[0]],
        value_steps=values.steps,
        value_loss=values.loss,
        update_norms=done.update_norms,
        drift_norms={l: float(bank.delta(l).norm()) for l in hp.layers},
        value_work=value_work,
        removed=[r.fact.id for r in plan.remove] if plan is not None else [],
        constraints=done.constraints,
    )
    return report, record
