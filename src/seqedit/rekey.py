"""Rekey: re-read every fact's keys on the current model and re-solve all edited layers from W₀, which is
the one-time edit of the facts in force as a one-time editor computes it.

Why. A layer's constraint holds the key its fact had when it was written. Later steps change the layers
below, so the model comes to present another key at an upper layer (key drift,
``docs/experiments/long-run-tuning.md``), and the old constraint stops acting on the fact. A one-time MEMIT of all
facts reads layer ℓ's keys after the layers below have absorbed every fact; sequential steps with frozen
keys reproduce a one-time solve of the keys *as they were read*, which is another thing once keys move.

How. From the facts' stored z-layer targets ``Z`` (the value optimisation is not repeated), every edited
layer goes back to W₀; then for each layer ℓ_i in ascending order the keys ``K_i`` and the z-layer states
``H_i`` of all facts in force are read on the current model, ``V_i = W₀ K_i + (Z − H_i)/(L − i)``, and the
layer is solved from W₀ on all columns and written before the next layer reads its keys. The step is
committed as a ledger step of kind ``rekey`` that re-adds every fact in force with its new ``(K, V)``
(rounded to the storage dtype before the solve, so that a replay repeats it) and is always snapshotted.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .bank import LayerBank
from .errors import SeqEditError
from .ledger.columns import column_groups, targets
from .ledger.session import LedgerSession
from .ledger.store import LedgerError, StepRecord
from .locate.keys import KeyReader
from .methods import METHODS, MethodSpec, method_info
from .models.load import LoadedModel
from .models.presets import EditHParams
from .pipeline import step_rows
from .progress import ProgressCallback
from .step_engine import solve_layers

__all__ = ["check_exact", "rekey_due", "rekey_step"]


def check_exact(spec: MethodSpec) -> None:
    """Refuse forms whose weights are not the one-time solution of the facts in force: for them a
    re-solve from W₀ is not a re-reading of the same objective."""
    if not spec.capabilities.exact:
        exact = sorted(f"{n}/{a}" for n in METHODS for a, f in method_info(n).forms.items() if f.capabilities.exact)
        raise SeqEditError(f"{spec.label} does not keep the one-time solution of the facts in force, so a "
                           f"rekey (a one-time re-solve on new keys) would change what it edits; forms that "
                           f"support it: {', '.join(exact)}")


def rekey_step(loaded: LoadedModel, bank: LayerBank, session: LedgerSession, hp: EditHParams,
               get_templates: Callable[[], list[str]], progress: ProgressCallback | None = None) -> StepRecord:
    """Re-read the keys of every fact in force and re-solve every edited layer from W₀ (module docstring);
    commit it as a ``rekey`` step. All-or-nothing: a failure leaves the bank and the ledger as they were.
    The record's info holds ``residual_norms`` (‖Z − H_i‖ per layer), ``final_residual`` and ``seconds``."""
    check_exact(bank.spec)
    L = session.open()
    rows = L.in_force()
    if not rows:
        raise LedgerError(f"ledger {L.path} has no facts in force to rekey")
    groups = column_groups(L, rows)
    if len({width for _, width, _, _ in groups}) > 1:
        raise LedgerError(f"ledger {L.path} holds facts with different numbers of key columns "
                          f"({sorted({w for _, w, _, _ in groups})}): a rekey step stores one width")
    Z = targets(L, rows)  # [d_z, C], refused before any work if a step stores none
    sec = {"keys": 0.0, "solve": 0.0}
    t = time.perf_counter()
    templates = get_templates()
    readers: list[tuple[torch.Tensor, KeyReader, KeyReader]] = []
    for fmt, width, idx, cols in groups:
        ctx, primary = step_rows(loaded.tokenizer, [rows[i].fact for i in idx], templates, fmt, width > 1)
        readers.append((cols, KeyReader(loaded, ctx, hp.key_batch_rows), KeyReader(loaded, primary, hp.key_batch_rows)))

    def read(layer: int | None, frozen_below: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        K = None if layer is None else torch.empty(bank.w0[layer].shape[1], Z.shape[1], dtype=torch.float64)
        H = torch.empty_like(Z)
        for cols, ctx_reader, primary_reader in readers:
            if K is not None:
                K[:, cols] = ctx_reader.read([layer], frozen_below=frozen_below).keys[layer].to(torch.float64).cpu()
            H[:, cols] = primary_reader.read([], z_layer=hp.z_layer, frozen_below=frozen_below).z_hidden.to(torch.float64).cpu()
        return K, H

    sec["templates"] = time.perf_counter() - t
    residual_norms: dict[str, float] = {}

    def columns(i: int, layer: int):
        K, H = read(layer, layer)
        residual_norms[str(layer)] = float((Z - H).norm())
        return K, None, bank.w0[layer].cpu() @ K + (Z - H) / hp.residual_divisor(i)

    with session.one_transaction():  # the commit and its timing: one journal transaction
        with bank.transaction():
            for layer in hp.layers:  # a one-time editor starts from the base weights
                bank.replace(layer, *bank.one_time(layer, None, None))
            done = solve_layers(bank, session, hp.layers, columns, from_base=True, progress=progress, message="rekey")
            sec["keys"] += done.seconds["keys"]
            sec["solve"] += done.seconds["solve"] + done.seconds["apply"]
            constraints = done.constraints
            t = time.perf_counter()
            _, H = read(None, 0)
            sec["keys"] += time.perf_counter() - t
            info = {"facts": len(rows), "residual_norms": residual_norms, "final_residual": float((Z - H).norm()),
                    "target_norm": residual_norms[str(hp.layers[0])], "seconds": sec}
            t = time.perf_counter()
            record = session.commit_rekey(rows, constraints, Z, info)
            sec["commit"] = time.perf_counter() - t
        L.annotate(record.id, {"seconds": sec})
    return L.step(record.id)


def rekey_due(applied_steps: int, every: int) -> bool:
    """Whether a run that rekeys every ``every`` apply steps (0: never) rekeys after ``applied_steps``."""
    return every > 0 and applied_steps > 0 and applied_steps % every == 0

