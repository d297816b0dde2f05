"""Target values: batched optimisation of one δ row per fact (MEMIT ``compute_z``, REFERENCE_NOTES §1.4).

For fact f, δ_f is added to the residual stream at the output of the z-layer block, at the
subject's last token of each of its rows (T rewriting rows = context templates + prompt + target,
and one KL row ``"{subject} is a"``). The loss of fact f is

    L_f(δ) = mean_rows NLL_len-normalised(target) + κ·KL(p_δ ‖ p_0)  + β·‖δ_f‖ / ‖h0_f‖²

with p at the subject's last token of the KL row, optimised by Adam with per-fact early stopping
(loss < ``early_stop_loss``, checked before the step), norm clamp ‖δ‖ ≤ c·‖h0‖ after each step, and
at most ``v_steps − 1`` updates. The output is ``z_f = h0_f + δ_f``.

What is computed, and why it is exact: with causal attention nothing before the subject's last
token depends on δ, in any layer. Each row is therefore split there: the *prefix* runs once per
chunk (no grad) and is kept as a KV cache; every iteration runs only the *suffix* (subject-last
token onwards) with that cache. Vocabulary logits are formed only at label positions and the KL
position. Facts never interact (the total loss is a sum, Adam is element-wise and converged rows are
frozen, moments included), so optimising a chunk of facts together equals optimising each alone.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..facts import Fact
from ..models.presets import EditHParams
from .tokens import encode_prompt, pad_id_of, target_ids
from .trace import block_hidden, hooks, replace_block_hidden

KL_PROMPT = "{} is a"


@dataclass
class ValueResult:
    """``z, h0: [d_out, n]`` float64; per-fact optimisation diagnostics."""

    z: torch.Tensor
    h0: torch.Tensor
    steps: list[int]  # Adam updates taken by each fact
    loss: list[float]  # final total loss per fact
    nll: list[float]  # final mean target NLL per fact (nats per token)
    seconds: float = 0.0
    iterations: int = 0  # batched iterations run (max over chunks of the longest fact)
    row_tokens: int = 0  # suffix tokens processed over all iterations (the δ-dependent work)


@dataclass
class _Row:
    fact: int  # index within the chunk
    prefix: list[int]
    suffix: list[int]
    label_pos: list[int]  # suffix positions whose logits predict `labels`
    labels: list[int]
    kl: bool
    bare: bool


def _build_rows(tokenizer, facts: Sequence[Fact], templates: Sequence[str]) -> list[_Row]:
    rows: list[_Row] = []
    for fi, fact in enumerate(facts):
        tgt = list(target_ids(tokenizer, fact.target))
        for ti, tmpl in enumerate(templates):
            enc = encode_prompt(tokenizer, tmpl, fact.prompt, fact.subject)
            full = list(enc.ids) + tgt[:-1]
            s = enc.subject_last
            first = len(enc.ids) - 1 - s  # suffix position predicting tgt[0]
            rows.append(
                _Row(fi, full[:s], full[s:], [first + j for j in range(len(tgt))], tgt, False, ti == 0)
            )
        enc = encode_prompt(tokenizer, "{}", KL_PROMPT, fact.subject)
        s = enc.subject_last
        rows.append(_Row(fi, list(enc.ids[:s]), [enc.ids[s]], [0], [], True, False))
    return rows


class _PrefixCache:
    """Per-layer prefix keys/values; hands out a fresh ``DynamicCache`` view for every pass."""

    def __init__(self, cache):
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]

    def select(self, index: torch.Tensor) -> None:
        self.kv = [(k[index], v[index]) for k, v in self.kv]

    def fresh(self):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=self.kv)


class _LowerBlocksReplay:
    """Skips blocks ``0..z`` in suffix passes after the first: their suffix outputs do not depend on δ.

    The first pass records block z's clean output (before δ is added); later passes make blocks
    below z pass their input through untouched and block z return the recorded output, so only the
    layers above z (and the δ-injection hook) do work. Rows are re-selected as facts converge.
    """

    def __init__(self, adapter, z_layer: int):
        self.blocks = [adapter.block(i) for i in range(z_layer + 1)]
        self.z_out = None  # block z's output structure from the first pass
        self.z_hidden: torch.Tensor | None = None

    def record(self, out) -> None:
        self.z_out = out
        self.z_hidden = block_hidden(out).detach()

    def select(self, index: torch.Tensor) -> None:
        self.z_hidden = self.z_hidden[index]

    @contextmanager
    def skipping(self):
        if self.z_hidden is None:
            yield
            return
        *lower, top = self.blocks

        def passthrough(*args, **kwargs):
            return replace_block_hidden(self.z_out, args[0] if args else kwargs["hidden_states"])

        def recorded(*args, **kwargs):
            return replace_block_hidden(self.z_out, self.z_hidden)

        for b in lower:
            b.forward = passthrough
        top.forward = recorded
        try:
            yield
        finally:
            for b in self.blocks:
                del b.forward  # back to the class's forward


def _adam_step(p, g, m, v, t: int, lr: float, b1=0.9, b2=0.999, eps=1e-8) -> None:
    """One Adam update of rows ``p`` (in place), identical to ``torch.optim.Adam`` defaults."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v / (1 - b2**t)).sqrt_().add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


def _optimise_chunk(loaded, facts: Sequence[Fact], templates: Sequence[str], hp: EditHParams):
    model, tok, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    device = next(model.parameters()).device
    base = model.base_model
    unembed = adapter.unembed
    pad = pad_id_of(tok)
    rows = _build_rows(tok, facts, templates)
    n = len(facts)
    d = adapter.dims(hp.z_layer)[0]

    P = max(len(r.prefix) for r in rows)
    S = max(len(r.suffix) for r in rows)
    pre_ids = torch.full((len(rows), P), pad, dtype=torch.long)
    pre_mask = torch.zeros((len(rows), P), dtype=torch.long)
    suf_ids = torch.full((len(rows), S), pad, dtype=torch.long)
    suf_mask = torch.zeros((len(rows), S), dtype=torch.long)
    for i, r in enumerate(rows):
        if r.prefix:  # left-padded prefix, right-padded suffix: the two meet without a gap
            pre_ids[i, P - len(r.prefix) :] = torch.tensor(r.prefix)
            pre_mask[i, P - len(r.prefix) :] = 1
        suf_ids[i, : len(r.suffix)] = torch.tensor(r.suffix)
        suf_mask[i, : len(r.suffix)] = 1
    pre_len = pre_mask.sum(1)
    pre_pos = (torch.cumsum(pre_mask, 1) - 1).clamp(min=0)
    suf_pos = pre_len[:, None] + torch.arange(S)[None, :]
    full_mask = torch.cat([pre_mask, suf_mask], 1)

    prefix = None
    if P > 0:
        with torch.no_grad():
            out = base(
                input_ids=pre_ids.to(device),
                attention_mask=pre_mask.to(device),
                position_ids=pre_pos.to(device),
                use_cache=True,
            )
        prefix = _PrefixCache(out.past_key_values)

    replay = _LowerBlocksReplay(adapter, hp.z_layer)
    row_fact = torch.tensor([r.fact for r in rows])
    delta = torch.zeros((n, d), dtype=torch.float32, device=device)
    m_state, v_state = torch.zeros_like(delta), torch.zeros_like(delta)
    h0 = torch.zeros((n, d), dtype=torch.float32, device=device)
    h0_seen = torch.zeros(n, dtype=torch.bool)
    kl_init: dict[int, torch.Tensor] = {}
    steps = [0] * n
    final_loss = [math.nan] * n
    final_nll = [math.nan] * n

    active = list(range(n))  # facts still optimised
    row_sel = torch.arange(len(rows))  # rows currently in the batch (those of active facts)
    iterations = tokens = 0
    for it in range(hp.v_steps):
        iterations += 1
        sel_rows = [rows[i] for i in row_sel.tolist()]
        fact_of_row = row_fact[row_sel].to(device)
        act_idx = torch.tensor(active, device=device)
        # δ of the active facts as a leaf, so the graph and the gradient cover only them
        d_act = delta[act_idx].clone().requires_grad_(True)
        local = {f: j for j, f in enumerate(active)}
        local_of_row = torch.tensor([local[r.fact] for r in sel_rows], device=device)

        def inject(_m, _a, out):
            h = block_hidden(out)
            if replay.z_hidden is None:
                replay.record(out)
            if it == 0:
                bare = torch.tensor([r.bare for r in sel_rows], device=device)
                h0[fact_of_row[bare]] = h[bare, 0].detach().float()
                h0_seen[fact_of_row[bare].cpu()] = True
            add = torch.zeros_like(h)
            add[:, 0] = d_act[local_of_row].to(h.dtype)
            return replace_block_hidden(out, h + add)

        inject_handle = adapter.block(hp.z_layer).register_forward_hook(inject)
        with torch.enable_grad(), hooks([inject_handle]), replay.skipping():
            hidden = base(
                input_ids=suf_ids[row_sel].to(device),
                attention_mask=full_mask[row_sel].to(device),
                position_ids=suf_pos[row_sel].to(device),
                past_key_values=prefix.fresh() if prefix is not None else None,
                use_cache=prefix is not None,
            ).last_hidden_state
            tokens += int(suf_mask[row_sel].sum())

            # NLL at label positions only
            lab_r, lab_p, lab_y, lab_w = [], [], [], []
            n_rew = torch.zeros(len(active), device=device)
            for j, r in enumerate(sel_rows):
                if r.kl:
                    continue
                n_rew[local[r.fact]] += 1
                for p, y in zip(r.label_pos, r.labels):
                    lab_r.append(j)
                    lab_p.append(p)
                    lab_y.append(y)
                    lab_w.append(1.0 / len(r.labels))
            logits = unembed(hidden[lab_r, lab_p]).float()
            tok_nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(lab_y, device=device)[:, None])[:, 0]
            row_local = local_of_row[torch.tensor(lab_r, device=device)]
            nll = torch.zeros(len(active), device=device).index_add(
                0, row_local, tok_nll * torch.tensor(lab_w, device=device)
            ) / n_rew

            kl_rows = [j for j, r in enumerate(sel_rows) if r.kl]
            kl_logp = torch.log_softmax(unembed(hidden[kl_rows, 0]).float(), -1)
            kl_facts = [sel_rows[j].fact for j in kl_rows]
            if it == 0:
                for f, lp in zip(kl_facts, kl_logp.detach()):
                    kl_init[f] = lp
            init = torch.stack([kl_init[f] for f in kl_facts])
            kl_vals = (kl_logp.exp() * (kl_logp - init)).sum(-1)
            kl = torch.zeros(len(active), device=device).index_add(
                0, torch.tensor([local[f] for f in kl_facts], device=device), kl_vals
            )

            h0_norm = h0[act_idx].norm(dim=-1)
            wd = hp.v_weight_decay * d_act.norm(dim=-1) / h0_norm**2
            loss = nll + hp.kl_factor * kl + wd

        loss_d = loss.detach()
        for j, f in enumerate(active):
            final_loss[f] = float(loss_d[j])
            final_nll[f] = float(nll[j].detach())
        done = loss_d < hp.early_stop_loss
        if it == hp.v_steps - 1 or bool(done.all()):
            break
        keep = (~done).nonzero()[:, 0]
        # the sum of per-fact losses: ∂/∂δ_f only sees fact f's own loss
        (grad,) = torch.autograd.grad(loss[keep].sum(), d_act)
        g = grad[keep]
        upd = act_idx[keep]
        p, m_, v_ = delta[upd], m_state[upd], v_state[upd]
        _adam_step(p, g, m_, v_, it + 1, hp.v_lr)
        max_norm = hp.clamp_norm_factor * h0[upd].norm(dim=-1, keepdim=True)
        p = p * torch.clamp(max_norm / p.norm(dim=-1, keepdim=True).clamp(min=1e-12), max=1.0)
        delta[upd], m_state[upd], v_state[upd] = p, m_, v_
        for f in upd.tolist():
            steps[f] += 1
        if bool(done.any()):
            active = [active[j] for j in keep.tolist()]
            still = set(active)
            keep_rows = torch.tensor([k for k, i in enumerate(row_sel.tolist()) if rows[i].fact in still])
            row_sel = row_sel[keep_rows]
            replay.select(keep_rows.to(device))
            if prefix is not None:
                prefix.select(keep_rows.to(device))

    assert bool(h0_seen.all()), "every fact has a bare row"
    z = (h0 + delta).to(torch.float64).cpu()
    return z, h0.to(torch.float64).cpu(), steps, final_loss, final_nll, iterations, tokens


@contextmanager
def _frozen_parameters(model):
    """Parameters need no gradient here; freezing them keeps autograd from saving or computing any."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def compute_values(
    loaded,
    facts: Sequence[Fact],
    templates: Sequence[str],
    hp: EditHParams,
    progress: Callable[[int], None] | None = None,
) -> ValueResult:
    """Optimise target values for ``facts`` on the current model, ``hp.v_batch_facts`` at a time.

    Returns ``z, h0: [d_out, n]`` in float64 (block output of the z-layer at the subject's last token).
    """
    t0 = time.perf_counter()
    zs, hs, steps, losses, nlls = [], [], [], [], []
    iterations = tokens = 0
    for lo in range(0, len(facts), hp.v_batch_facts):
        chunk = facts[lo : lo + hp.v_batch_facts]
        with _frozen_parameters(loaded.model):
            z, h0, st, lo_, nl, its, tk = _optimise_chunk(loaded, chunk, templates, hp)
        zs.append(z)
        hs.append(h0)
        steps += st
        losses += lo_
        nlls += nl
        iterations = max(iterations, its)
        tokens += tk
        if progress is not None:
            progress(len(chunk))
    return ValueResult(
        z=torch.cat(zs).T.contiguous(),
        h0=torch.cat(hs).T.contiguous(),
        steps=steps,
        loss=losses,
        nll=nlls,
        seconds=time.perf_counter() - t0,
        iterations=iterations,
        row_tokens=tokens,
    )


__all__ = ["ValueResult", "compute_values", "KL_PROMPT"]
