"""Shared by the ledger tests and the crash worker: tiny ledger editors and synthetic facts whose
per-layer (k, v) are a fixed function of the fact id, so the one-time solution of any set of facts in
force can be computed independently of the ledger."""

from __future__ import annotations

import random
import zlib

import torch

from seqedit import Editor, Fact
from seqedit.testing import tiny_model

LAYERS = (1, 2)
EDITOR_KW = dict(layers=LAYERS, stats_tokens=2000, lam=10.0, v_steps=2)  # make_editor's settings
D_IN, D_OUT = 64, 32


def make_editor(path, lm=None, **kw) -> Editor:
    """A ledger editor on a fresh tiny llama (or ``lm``): layers 1–2, Σ₀ on 2000 tokens, λ = 10."""
    kw = EDITOR_KW | kw
    return Editor(lm if lm is not None else tiny_model("llama"), ledger=path, **kw)


def committed_ledger(path, **kw) -> None:
    """A ledger at ``path`` holding one committed step (a new ledger exists only from its first step)."""
    ed = make_editor(path, **kw)
    apply_facts(ed, [fact(99)])
    ed.close()


def fact(slot: int, variant: int = 0) -> Fact:
    return Fact(prompt="{} is located in", subject=f"Place {slot}", target=f"Town {slot}-{variant}",
                id=f"f{slot}-{variant}")


def kv_of(fact_id: str, W0: dict[int, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(k: [D_IN], v: [D_OUT])`` of a fact, seeded by its id. Keys have the scale of the tiny
    model's real keys (Σ₀ eigenvalues ~1e-5..1e-4), targets move the output by ~0.1."""
    g = torch.Generator().manual_seed(zlib.crc32(fact_id.encode()))
    out = {}
    for l in LAYERS:
        k = 0.01 * torch.randn(D_IN, generator=g, dtype=torch.float64)
        out[l] = (k, W0[l] @ k + 0.1 * torch.randn(D_OUT, generator=g, dtype=torch.float64))
    return out


def columns(ids, W0) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    per = [kv_of(i, W0) for i in ids]
    K = {l: torch.stack([p[l][0] for p in per], 1) if per else torch.zeros(D_IN, 0, dtype=torch.float64) for l in LAYERS}
    V = {l: torch.stack([p[l][1] for p in per], 1) if per else torch.zeros(D_OUT, 0, dtype=torch.float64) for l in LAYERS}
    return K, V


def apply_facts(editor: Editor, facts: list[Fact]):
    K, V = columns([f.id for f in facts], editor.w0 or _w0(editor))
    editor.apply_kv(K, V, facts=facts)
    return editor.last_record


def _w0(editor: Editor) -> dict[int, torch.Tensor]:
    return {l: editor.loaded.adapter.weight(l).to(torch.float64) for l in LAYERS}


def ote_gap(editor: Editor, ids) -> float:
    """max over layers of ‖W_live − W_OTE‖ / ‖W_OTE − W₀‖ with W_OTE solved by a fresh method state from
    the test's own (k, v) of ``ids`` (not the ledger's stored ones)."""
    editor.prepare()
    K, V = columns(sorted(ids), editor.w0)
    gaps = []
    for l in LAYERS:
        _, W = editor.bank.one_time(l, K[l], V[l])
        scale = float((W - editor.w0[l]).norm()) or float(editor.w0[l].norm())
        gaps.append(float((editor.master[l] - W).norm()) / scale)
    return max(gaps)


CRASH_SLOTS = 12


def next_op(editor, step: int) -> None:
    """Step ``step``'s operation: a deterministic function of ``step`` and the ledger's state."""
    rng = random.Random(step)
    L = editor.ledger
    roll = rng.random()
    live = sorted(f.id for f in editor.facts_in_force())
    if roll < 0.15 and live:
        editor.forget([rng.choice(live)])
    elif roll < 0.3 and step > 1 and L.step(step - 1).undone_by is None:
        editor.undo(step - 1)
    else:
        slots = rng.sample(range(CRASH_SLOTS), 2)
        apply_facts(editor, [fact(s, step) for s in slots])


def frozen_cf_targets(facts):
    """The target values of real CounterFact ``facts`` on a fresh tiny llama under :data:`EDITOR_KW`,
    optimised once (``locate.frozen``), so that several editors can edit the very same values."""
    from seqedit.locate.frozen import frozen_targets

    probe = Editor(tiny_model("llama"), **EDITOR_KW)
    return frozen_targets(probe.loaded, facts, probe.templates(), probe.hparams)
