"""Target values: batched optimisation of one δ row per fact (MEMIT ``compute_z``, REFERENCE_NOTES §1.4).

For fact f, δ_f is added to the residual stream at the output of the z-layer block, at the
subject's last token of each of its rows (T rewriting rows = context templates + prompt + target,
and one KL row ``"{subject} is a"``). The loss of fact f is

    L_f(δ) = mean_rows NLL_len-normalised(target) + κ·KL(p_δ ‖ p_0)  + β·‖δ_f‖ / ‖h0_f‖²
             [+ κ_c·mean_formats KL(p_δ ‖ p_0) after the whole target]

with p at the subject's last token of the KL row, optimised by Adam with per-fact early stopping
(loss < ``early_stop_loss``, checked before the step), norm clamp ‖δ‖ ≤ c·√F·‖h0‖ after each step, and
at most ``v_steps − 1`` updates. The output is ``z_f = h0_f + δ_f``. F is the number of prompt formats
the rows are written in (``prompt_format="both"``: 2): one δ then has to move the answer in two quite
different contexts, whose demands add roughly orthogonally, so the budget of one format (c) grows by √F.
The bracketed term (``hp.continuation_kl`` = κ_c > 0) scores one more position on each format's
template-free row (the prompt itself), the token after the whole new target, against the distribution
the model had there before δ (iteration 0), averaged over the formats: what follows the new object
should stay what followed it, so that the object is not simply repeated.

What is computed, and why it is exact: with causal attention nothing before the subject's last
token depends on δ, in any layer. Each row is therefore split there: the *prefix* runs once per
chunk (no grad) and is kept as a KV cache; every iteration runs only the *suffix* (subject-last
token onwards) with that cache, and blocks up to the z-layer run on the suffix only once (their
output there is recorded and replayed), so each iteration computes just the blocks above the
z-layer. Suffix rows are grouped by length to keep padding small, vocabulary logits are formed only
at label positions and the KL position, and parameters are frozen so autograd computes only ∂L/∂δ.
Facts never interact (the total loss is a sum, Adam is element-wise and converged rows are
frozen, moments included), so optimising a chunk of facts together equals optimising each alone.

Precision (``hp.v_compute_dtype``): with ``"bfloat16"`` (or ``"float16"``) on a float32 model the
forward and backward matmuls run under autocast (4.5× the float32 GEMM rate on a CPU with AMX); δ,
Adam's moments and the losses stay float32. The returned ``h0`` is then re-read in the model's own
precision (one truncated forward of the bare rows) and ``z = h0 + δ``, so that the residual
``z − H`` the solver sees carries no reduced-precision error in ``h0`` itself (which, at ‖h0‖ ≈ 150,
would be of the size of a small edit).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..facts import Fact
from ..models.presets import EditHParams
from .chat import formats
from .keys import ContextRows, read_keys
from .trace import block_hidden, replace_block_hidden
from .value_rows import KL_PROMPT, RowGroup, build_rows, length_groups


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
    padded_tokens: int = 0  # the same with the padding of each length group
    head_positions: int = 0  # positions whose vocabulary logits were formed (labels + KL)
    stepped_tokens: int = 0  # suffix tokens of the passes followed by a backward pass
    stepped_heads: int = 0  # scored positions of those passes

    def delta_flops(self, loaded, z_layer: int) -> float:
        """FLOPs of the work that truly depends on δ (real tokens, no padding).

        Matmuls of the blocks above the z-layer on the suffix tokens and the unembedding at the
        scored positions: 2 FLOP per weight per token forward, and as much again for the backward
        pass (input gradients only, parameters are frozen). Attention scores are ignored (short rows).
        """
        adapter = loaded.adapter
        upper = sum(
            p.numel()
            for i in range(z_layer + 1, adapter.n_layers)
            for p in adapter.block(i).parameters()
            if p.dim() == 2
        )
        head = adapter.unembed.weight.numel()
        tokens = self.row_tokens + self.stepped_tokens
        heads = self.head_positions + self.stepped_heads
        return 2.0 * (upper * tokens + head * heads)


def _kl(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ p_0)`` per row of log-probabilities ``logp, ref: [rows, vocab]``."""
    return (logp.exp() * (logp - ref.to(logp.device))).sum(-1)


def _adam_step(p, g, m, v, t: int, lr: float, b1=0.9, b2=0.999, eps=1e-8) -> None:
    """One Adam update of rows ``p`` (in place), identical to ``torch.optim.Adam`` defaults."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v / (1 - b2**t)).sqrt_().add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


def _reduced_precision(loaded, hp: EditHParams):
    """The autocast context of the value optimisation, or ``None`` when it runs in the model's dtype."""
    dtype = getattr(torch, hp.v_compute_dtype)
    weight = loaded.adapter.unembed.weight
    if dtype.itemsize >= weight.dtype.itemsize:
        return None
    return torch.autocast(device_type=weight.device.type, dtype=dtype)


def delta_budget(hp: EditHParams, prompt_format: str) -> float:
    """The clamp factor of ‖δ‖/‖h0‖: ``clamp_norm_factor·√F`` for the F formats of ``prompt_format``."""
    return hp.clamp_norm_factor * math.sqrt(len(formats(prompt_format)))


def _optimise_chunk(loaded, facts: Sequence[Fact], templates: Sequence[str], hp: EditHParams, prompt_format: str):
    adapter = loaded.adapter
    device = adapter.device(hp.z_layer)  # δ lives where it is injected
    unembed = adapter.unembed
    autocast = _reduced_precision(loaded, hp)
    compute = autocast if autocast is not None else nullcontext()
    continuation = hp.continuation_kl > 0
    rows = build_rows(loaded.tokenizer, facts, templates, prompt_format, continuation)
    with compute:
        groups = [
            RowGroup(loaded, [rows[i] for i in g], hp.z_layer)
            for g in length_groups([len(r.suffix) for r in rows])
        ]
    n, n_templates = len(facts), len(templates) * len(formats(prompt_format))  # rewriting rows per fact
    budget = delta_budget(hp, prompt_format)
    d = adapter.dims(hp.z_layer)[0]
    delta = torch.zeros((n, d), dtype=torch.float32, device=device)
    m_state, v_state = torch.zeros_like(delta), torch.zeros_like(delta)
    h0 = torch.zeros((n, d), dtype=torch.float32, device=device)
    h0_seen = torch.zeros(n, dtype=torch.bool)
    kl_init = torch.zeros((n, adapter.unembed.weight.shape[0]), dtype=torch.float32, device=device)
    # the continuation positions' log-probabilities before δ (iteration 0): one per fact and format
    n_formats = len(formats(prompt_format))
    cont_init = torch.zeros((n * n_formats if continuation else 0, kl_init.shape[1]), dtype=torch.float32,
                            device=device)
    steps = [0] * n
    final_loss = [math.nan] * n
    final_nll = [math.nan] * n

    active = list(range(n))  # facts still optimised
    iterations = tokens = padded = heads = stepped_tokens = stepped_heads = 0
    for it in range(hp.v_steps):
        iterations += 1
        it_tokens = it_heads = 0
        act_idx = torch.tensor(active, device=device)
        local = {f: j for j, f in enumerate(active)}
        # δ of the active facts as a leaf, so the graph and the gradient cover only them
        d_act = delta[act_idx].clone().requires_grad_(True)

        def inject(out, group: RowGroup):
            h = block_hidden(out)
            if group.replay.hidden is None:
                group.replay.record(out)
                bare = [i for i, r in enumerate(group.rows) if r.bare]
                if bare:
                    facts_b = torch.tensor([group.rows[i].fact for i in bare], device=device)
                    h0[facts_b] = h[bare, 0].detach().float()
                    h0_seen[facts_b.cpu()] = True
            rows_local = torch.tensor([local[r.fact] for r in group.rows], device=device)
            add = torch.zeros_like(h)
            add[:, 0] = d_act[rows_local].to(h.device, h.dtype)
            return replace_block_hidden(out, h + add)

        nll = torch.zeros(len(active), device=device)
        kl = torch.zeros(len(active), device=device)
        cont_kl = torch.zeros(len(active), device=device)
        with torch.enable_grad(), compute:
            for group in groups:
                if not group.rows:
                    continue
                hidden = group.forward(loaded, hp.z_layer, inject)
                it_tokens += int(group.tokens.sum())
                padded += group.suf_ids.numel()
                lab_r, lab_p, lab_y, lab_w, lab_f = [], [], [], [], []
                kl_r, kl_f = [], []
                cont_r, cont_p, cont_ids, cont_f = [], [], [], []
                for j, r in enumerate(group.rows):
                    if r.kl:
                        kl_r.append(j)
                        kl_f.append(r.fact)
                        continue
                    if r.cont >= 0:
                        cont_r.append(j)
                        cont_p.append(r.cont)
                        cont_ids.append(r.cont_id)
                        cont_f.append(local[r.fact])
                    for p, y in zip(r.label_pos, r.labels):
                        lab_r.append(j)
                        lab_p.append(p)
                        lab_y.append(y)
                        lab_w.append(1.0 / (len(r.labels) * n_templates))
                        lab_f.append(local[r.fact])
                it_heads += len(lab_r) + len(kl_r) + len(cont_r)
                if lab_r:  # NLL at label positions only: mean per row, mean over the fact's templates
                    logp = torch.log_softmax(unembed(hidden[lab_r, lab_p]).float(), -1)
                    tok_nll = -logp.gather(1, torch.tensor(lab_y, device=logp.device)[:, None])[:, 0]
                    w = torch.tensor(lab_w, device=logp.device)
                    nll = nll.index_add(0, torch.tensor(lab_f, device=device), (tok_nll * w).to(device))
                if kl_r:  # KL(p_δ ‖ p_0) of the next token after the subject
                    kl_logp = torch.log_softmax(unembed(hidden[kl_r, 0]).float(), -1)
                    fidx = torch.tensor(kl_f, device=device)
                    if it == 0:
                        kl_init[fidx] = kl_logp.detach().to(device)
                    vals = _kl(kl_logp, kl_init[fidx])
                    kl = kl.index_add(0, torch.tensor([local[f] for f in kl_f], device=device), vals.to(device))
                if cont_r:  # KL(p_δ ‖ p_0) after the whole target, mean over the fact's formats
                    c_logp = torch.log_softmax(unembed(hidden[cont_r, cont_p]).float(), -1)
                    cidx = torch.tensor(cont_ids, device=device)
                    if it == 0:
                        cont_init[cidx] = c_logp.detach().to(device)
                    vals = _kl(c_logp, cont_init[cidx]) / n_formats
                    cont_kl = cont_kl.index_add(0, torch.tensor(cont_f, device=device), vals.to(device))
            wd = hp.v_weight_decay * d_act.norm(dim=-1) / h0[act_idx].norm(dim=-1) ** 2
            loss = nll + hp.kl_factor * kl + wd + hp.continuation_kl * cont_kl

        tokens += it_tokens
        heads += it_heads
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
        stepped_tokens += it_tokens
        stepped_heads += it_heads
        upd = act_idx[keep]
        p, m_, v_ = delta[upd], m_state[upd], v_state[upd]
        _adam_step(p, grad[keep], m_, v_, it + 1, hp.v_lr)
        max_norm = budget * h0[upd].norm(dim=-1, keepdim=True)
        p = p * torch.clamp(max_norm / p.norm(dim=-1, keepdim=True).clamp(min=1e-12), max=1.0)
        delta[upd], m_state[upd], v_state[upd] = p, m_, v_
        for f in upd.tolist():
            steps[f] += 1
        if bool(done.any()):
            active = [active[j] for j in keep.tolist()]
            alive = set(active)
            for group in groups:
                group.keep(alive)

    assert bool(h0_seen.all()), "every fact has a bare row"
    if autocast is None:
        z, h0 = (h0 + delta).to(torch.float64).cpu(), h0.to(torch.float64).cpu()
    else:  # h0 in the model's precision (see the module docstring)
        bare = ContextRows.build(loaded.tokenizer, facts, ["{}"], formats(prompt_format)[0])
        h0 = read_keys(loaded, bare, [], z_layer=hp.z_layer, batch_rows=hp.key_batch_rows).z_hidden.T
        z = h0 + delta.to(torch.float64).cpu()
    counts = {
        "row_tokens": tokens, "padded_tokens": padded, "head_positions": heads,
        "stepped_tokens": stepped_tokens, "stepped_heads": stepped_heads,
    }
    return z, h0, steps, final_loss, final_nll, iterations, counts


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
    prompt_format: str = "bare",
) -> ValueResult:
    """Optimise target values for ``facts`` on the current model, ``hp.v_batch_facts`` at a time, over
    the rows of ``prompt_format`` (``locate/chat.py``; the NLL is the mean over all rewriting rows).

    Returns ``z, h0: [d_out, n]`` in float64 (block output of the z-layer at the subject's last token
    of each fact's primary row: the bare one, or the chat one for ``prompt_format="chat"``).
    """
    t0 = time.perf_counter()
    zs, hs, steps, losses, nlls = [], [], [], [], []
    iterations = 0
    counts = dict.fromkeys(("row_tokens", "padded_tokens", "head_positions", "stepped_tokens", "stepped_heads"), 0)
    for lo in range(0, len(facts), hp.v_batch_facts):
        chunk = facts[lo : lo + hp.v_batch_facts]
        with _frozen_parameters(loaded.model):
            z, h0, st, lo_, nl, its, tk = _optimise_chunk(loaded, chunk, templates, hp, prompt_format)
        zs.append(z)
        hs.append(h0)
        steps += st
        losses += lo_
        nlls += nl
        iterations = max(iterations, its)
        for k, v in tk.items():
            counts[k] += v
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
        **counts,
    )


__all__ = ["KL_PROMPT", "ValueResult", "compute_values", "delta_budget"]
