"""Target values: batched optimisation of one δ row per fact (MEMIT ``compute_z``, REFERENCE_NOTES §1.4).

For fact f, δ_f is added to the residual stream at the output of the z-layer block, at the
subject's last token of each of its rows (T rewriting rows = context templates + prompt + target,
and one KL row ``"{subject} is a"``). The loss of fact f is

    L_f(δ) = mean_rows NLL_len-normalised(target) + κ·KL(p_δ ‖ p_0)  + β·‖δ_f‖ / ‖h0_f‖²
             [+ κ_c·mean_formats KL(p_δ ‖ p_0) after the whole target]

with p at the subject's last token of the KL row, optimised by Adam with per-fact early stopping
checked before each step (``hp.stop_rule``: ``"nll"``, loss < ``early_stop_loss``; or
``"most_probable"``, the new target is the argmax at every target token of every rewriting row with a
lead of more than ``stop_margin`` nats over the runner-up), norm clamp ‖δ‖ ≤ c·√F·‖h0‖ after each
step, and at most ``v_steps − 1`` updates. With ``hp.budget_anchor="clean"`` the ‖h0‖ of the clamp is
read on the unedited model (:func:`clean_h0_norms`), so a residual stream that earlier edits inflated
does not widen later facts' budgets (the norm feedback loop NAS, arXiv 2602.02543, describes). The output is ``z_f = h0_f + δ_f``. F is the number of prompt formats
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

Precision (``hp.v_compute_dtype``): with ``"bfloat16"`` (or ``"float16"``; ``"auto"``: bfloat16 where it
is native, :func:`compute_dtype`) on a float32 model, the linear layers of the blocks above the z-layer
compute from a reduced-precision copy of their weights made once per call (``locate/low_precision.py``;
4–7× the float32 GEMM rate on a CPU with AMX). Everything else stays in the model's dtype: norms,
attention, the residual stream, the unembedding and losses, δ and Adam's moments; the blocks up to
the z-layer too, so h0 is the model's own and independent of the compute dtype.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.profiler import record_function

from ..facts import Fact
from ..models.presets import EditHParams
from .chat import formats
from .fused_blocks import FusedUpper
from .head_loss import head_losses, label_misses
from .keys import ContextRows, read_keys
from .low_precision import bf16_matmul_native, low_precision_linears
from .trace import block_hidden, frozen_parameters, replace_block_hidden
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
    delta_norms: list[float] = field(default_factory=list)  # ‖δ_f‖ = ‖z_f − h0_f‖ per fact
    budget_norms: list[float] = field(default_factory=list)  # the clamp limit each δ_f was held to

    def clamped_fraction(self, tol: float = 1e-3) -> float | None:
        """The share of facts whose δ ends on its norm clamp (within ``tol`` relative); ``None`` if unknown."""
        if not self.delta_norms:
            return None
        hit = sum(d >= (1 - tol) * b for d, b in zip(self.delta_norms, self.budget_norms))
        return hit / len(self.delta_norms)

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


def _adam_step(p, g, m, v, t: int, lr: float, b1=0.9, b2=0.999, eps=1e-8) -> None:
    """One Adam update of rows ``p`` (in place), identical to ``torch.optim.Adam`` defaults."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v / (1 - b2**t)).sqrt_().add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


def compute_dtype(loaded, hp: EditHParams) -> torch.dtype | None:
    """The reduced precision the upper blocks' linear layers run in (``hp.v_compute_dtype``), or ``None``
    when the value optimisation runs in the model's own dtype. ``"auto"`` is bfloat16 where bfloat16
    matrix products are native on the device δ lives on (:func:`~.low_precision.bf16_matmul_native`),
    the model's dtype elsewhere."""
    weight = loaded.adapter.unembed.weight
    if hp.v_compute_dtype == "auto":
        native = bf16_matmul_native(loaded.adapter.device(hp.z_layer))
        dtype = torch.bfloat16 if native else weight.dtype
    else:
        dtype = getattr(torch, hp.v_compute_dtype)
    return dtype if dtype.itemsize < weight.dtype.itemsize else None


def upper_blocks_dtype(loaded, hp: EditHParams) -> torch.dtype:
    """The dtype the upper blocks' linear layers run in: :func:`compute_dtype`, else the model's own."""
    return compute_dtype(loaded, hp) or loaded.adapter.unembed.weight.dtype


def _precision(loaded, hp: EditHParams):
    """The context the chunk runs in: the blocks above the z-layer in :func:`compute_dtype`, if any. The
    unembedding stays in the model's dtype: from a bfloat16 copy its logits decide the stop rule's 1-nat
    lead differently (efficacy after the 100-fact bench step 93 % against 96 %; docs/performance.md,
    stop 41), for a pass only 1-3 % shorter."""
    dtype = compute_dtype(loaded, hp)
    if dtype is None:
        return nullcontext()
    adapter = loaded.adapter
    return low_precision_linears([adapter.block(i) for i in range(hp.z_layer + 1, adapter.n_layers)], dtype)


def delta_budget(hp: EditHParams, prompt_format: str) -> float:
    """The clamp factor of ‖δ‖/‖h0‖: ``clamp_norm_factor·√F`` for the F formats of ``prompt_format``."""
    return hp.clamp_norm_factor * math.sqrt(len(formats(prompt_format)))


@dataclass
class _ChunkState:
    """What the optimisation of one chunk of ``n`` facts carries between iterations (``d`` = model width,
    ``V`` = vocabulary): δ and Adam's moments ``[n, d]``, ``h0 [n, d]`` (filled by the first forward), the
    iteration-0 distributions the KL terms compare against, and per-fact bookkeeping."""

    delta: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    h0: torch.Tensor
    h0_seen: torch.Tensor
    kl_init: torch.Tensor  # [n, V]
    cont_init: torch.Tensor  # [n·F, V] (empty without continuation KL)
    steps: list[int]
    final_loss: list[float]
    final_nll: list[float]
    counts: dict[str, int]

    @classmethod
    def zeros(cls, n: int, d: int, vocab: int, n_cont: int, device) -> _ChunkState:
        delta = torch.zeros((n, d), dtype=torch.float32, device=device)
        return cls(delta, torch.zeros_like(delta), torch.zeros_like(delta), torch.zeros_like(delta),
                   torch.zeros(n, dtype=torch.bool), torch.zeros((n, vocab), dtype=torch.float32, device=device),
                   torch.zeros((n_cont, vocab), dtype=torch.float32, device=device),
                   [0] * n, [math.nan] * n, [math.nan] * n, dict.fromkeys(_COUNTS, 0))


_COUNTS = ("row_tokens", "padded_tokens", "head_positions", "stepped_tokens", "stepped_heads")


@dataclass
class _IterationLoss:
    """One forward pass over the active facts (``[a]`` each, in ``active`` order): the total loss (with
    graph), its NLL part, the number of target tokens the fact does not yet win (argmax with the
    required lead), and the work done."""

    loss: torch.Tensor
    nll: torch.Tensor
    misses: torch.Tensor
    tokens: int
    heads: int


@dataclass(frozen=True)
class ChunkResult:
    """The optimised chunk: ``z, h0: [n, d]`` float64 (CPU), per-fact diagnostics (``delta_norm`` = ‖δ_f‖,
    ``budget_norm`` = the clamp limit c·√F·‖h0_ref,f‖ it was held to), and the work counters."""

    z: torch.Tensor
    h0: torch.Tensor
    steps: list[int]
    loss: list[float]
    nll: list[float]
    delta_norm: list[float]
    budget_norm: list[float]
    iterations: int
    counts: dict[str, int]


def _iteration_loss(loaded, hp: EditHParams, groups: list[RowGroup], st: _ChunkState, active: list[int],
                    d_act: torch.Tensor, first: bool, n_templates: int, n_formats: int,
                    upper: FusedUpper | None = None) -> _IterationLoss:
    """Forward every length group with δ injected at the z-layer and form the per-fact loss
    (module docstring). ``first``: iteration 0, which records h0 and the KL references. ``upper``: the
    fused forward of the blocks above the z-layer, or ``None`` for the model's own modules."""
    device = d_act.device
    unembed = loaded.adapter.unembed
    local = {f: j for j, f in enumerate(active)}

    def shift(h, group: RowGroup):  # block z's output with δ added at each row's subject-last token
        rows_local = torch.tensor([local[r.fact] for r in group.rows], device=device)
        add = torch.zeros_like(h)
        add[:, 0] = d_act[rows_local].to(h.device, h.dtype)
        return h + add

    def inject(out, group: RowGroup):
        if group.replay.hidden is None:
            group.replay.record(out)
        return replace_block_hidden(out, shift(block_hidden(out), group))

    a = len(active)
    tokens = 0
    # the scored positions of every group, unembedded together: one pass over the vocabulary matrix
    # per iteration instead of three per group (its reads dominate these small products)
    lab_h, lab_y, lab_w, lab_f = [], [], [], []
    kl_h, kl_f = [], []
    cont_h, cont_ids, cont_f = [], [], []
    live = [g for g in groups if g.rows]
    with record_function("values.forward.first" if first else "values.forward"):
        if upper is None:
            hiddens = [g.forward(loaded, hp.z_layer, inject) for g in live]
        else:  # every group's rows through each weight at once (FusedUpper.forward_groups)
            hiddens = upper.forward_groups([g.fused_input(loaded, hp.z_layer, upper, shift) for g in live])
    for group, hidden in zip(live, hiddens):
        if first:  # h0: block z's output at the subject's last token of each fact's primary row
            bare = [i for i, r in enumerate(group.rows) if r.bare]
            if bare:
                facts_b = torch.tensor([group.rows[i].fact for i in bare], device=device)
                st.h0[facts_b] = group.replay.hidden[bare, 0].float().to(device)
                st.h0_seen[facts_b.cpu()] = True
        tokens += int(group.tokens.sum())
        st.counts["padded_tokens"] += group.suf_ids.numel()
        lab_r, lab_p, kl_r, cont_r, cont_p = [], [], [], [], []
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
            for pos, y in zip(r.label_pos, r.labels):
                lab_r.append(j)
                lab_p.append(pos)
                lab_y.append(y)
                lab_w.append(1.0 / (len(r.labels) * n_templates))
                lab_f.append(local[r.fact])
        lab_h.append(hidden[lab_r, lab_p])
        kl_h.append(hidden[kl_r, 0])
        cont_h.append(hidden[cont_r, cont_p])
    with record_function("values.heads"):
        z = unembed(torch.cat(lab_h + kl_h + cont_h))
        y = torch.tensor(lab_y, device=z.device)
        fidx = torch.tensor(kl_f, device=device, dtype=torch.long)
        cidx = torch.tensor(cont_ids, device=device, dtype=torch.long)
        ref = None if first else torch.cat([st.kl_init[fidx], st.cont_init[cidx]])
        tok_nll, kls, logp_kl = head_losses(z, y, ref)
        if first:  # the KL references: each row's distribution before any update
            st.kl_init[fidx], st.cont_init[cidx] = logp_kl[: len(kl_f)].to(device), logp_kl[len(kl_f) :].to(device)
        kls = kls.to(device)
        # NLL at label positions only: mean per row, mean over the fact's templates
        f_idx = torch.tensor(lab_f, device=device)
        zeros = torch.zeros(a, device=device)
        nll = zeros.index_add(0, f_idx, (tok_nll * torch.tensor(lab_w, device=z.device)).to(device))
        misses = zeros.index_add(0, f_idx, label_misses(z[: len(lab_y)], y, hp.stop_margin).to(device))
        # KL(p_δ ‖ p_0) of the next token after the subject; after the whole target, mean over formats
        kl = zeros.index_add(0, torch.tensor([local[f] for f in kl_f], device=device), kls[: len(kl_f)])
        cont_kl = zeros.index_add(0, torch.tensor(cont_f, device=device, dtype=torch.long), kls[len(kl_f) :] / n_formats)
    heads = len(lab_y) + len(kl_f) + len(cont_f)
    act_idx = torch.tensor(active, device=device)
    wd = hp.v_weight_decay * d_act.norm(dim=-1) / st.h0[act_idx].norm(dim=-1) ** 2
    loss = nll + hp.kl_factor * kl + wd + hp.continuation_kl * cont_kl
    return _IterationLoss(loss, nll, misses, tokens, heads)


def _stopped(hp: EditHParams, it: _IterationLoss) -> torch.Tensor:
    """``[a]`` bool: the facts whose optimisation is over before this step (``hp.stop_rule``)."""
    if hp.stop_rule == "most_probable":
        return it.misses.detach() == 0
    return it.loss.detach() < hp.early_stop_loss


def _adam_clamped(st: _ChunkState, upd: torch.Tensor, grad: torch.Tensor, t: int, lr: float,
                  limit: torch.Tensor) -> None:
    """One Adam update of the facts ``upd`` (rows of the chunk) followed by the norm clamp
    ‖δ_f‖ ≤ ``limit[f]`` (``limit: [n]``)."""
    p, m_, v_ = st.delta[upd], st.m[upd], st.v[upd]
    _adam_step(p, grad, m_, v_, t, lr)
    max_norm = limit[upd][:, None]
    p = p * torch.clamp(max_norm / p.norm(dim=-1, keepdim=True).clamp(min=1e-12), max=1.0)
    st.delta[upd], st.m[upd], st.v[upd] = p, m_, v_
    for f in upd.tolist():
        st.steps[f] += 1


def _optimise_chunk(loaded, facts: Sequence[Fact], templates: Sequence[str], hp: EditHParams, prompt_format: str,
                    h0_norm_ref: torch.Tensor | None = None, upper: FusedUpper | None = None) -> ChunkResult:
    """δ for each of ``facts`` (module docstring); ``h0_norm_ref: [n]`` replaces ‖h0_f‖ in the norm
    budget (the clean model's norms with ``hp.budget_anchor="clean"``); ``upper`` as in
    :func:`_iteration_loss`."""
    adapter = loaded.adapter
    device = adapter.device(hp.z_layer)  # δ lives where it is injected
    continuation = hp.continuation_kl > 0
    rows = build_rows(loaded.tokenizer, facts, templates, prompt_format, continuation)
    with record_function("values.rows_and_prefix_cache"):
        groups = [RowGroup(loaded, [rows[i] for i in g], hp.z_layer) for g in length_groups([len(r.suffix) for r in rows])]
    n_formats = len(formats(prompt_format))
    n, n_templates = len(facts), len(templates) * n_formats  # rewriting rows per fact
    st = _ChunkState.zeros(n, adapter.dims(hp.z_layer)[0], adapter.unembed.weight.shape[0],
                           n * n_formats if continuation else 0, device)
    budget = delta_budget(hp, prompt_format)
    limit: torch.Tensor | None = None  # ‖δ_f‖ bound, known once h0 has been read (first forward)

    active = list(range(n))  # facts still optimised
    iterations = 0
    for it in range(hp.v_steps):
        iterations += 1
        act_idx = torch.tensor(active, device=device)
        # δ of the active facts as a leaf, so the graph and the gradient cover only them
        d_act = st.delta[act_idx].clone().requires_grad_(True)
        with torch.enable_grad():
            step = _iteration_loss(loaded, hp, groups, st, active, d_act, it == 0, n_templates, n_formats, upper)
        st.counts["row_tokens"] += step.tokens
        st.counts["head_positions"] += step.heads
        if limit is None:
            ref = st.h0.norm(dim=-1) if h0_norm_ref is None else h0_norm_ref.to(device, torch.float32)
            limit = budget * ref
        loss_d = step.loss.detach()
        for j, f in enumerate(active):
            st.final_loss[f] = float(loss_d[j])
            st.final_nll[f] = float(step.nll[j].detach())
        done = _stopped(hp, step)
        if it == hp.v_steps - 1 or bool(done.all()):
            break
        keep = (~done).nonzero()[:, 0]
        # the sum of per-fact losses: ∂/∂δ_f only sees fact f's own loss
        with record_function("values.backward"):
            (grad,) = torch.autograd.grad(step.loss[keep].sum(), d_act)
        st.counts["stepped_tokens"] += step.tokens
        st.counts["stepped_heads"] += step.heads
        with record_function("values.adam_and_bookkeeping"):
            _adam_clamped(st, act_idx[keep], grad[keep], it + 1, hp.v_lr, limit)
            if bool(done.any()):
                active = [active[j] for j in keep.tolist()]
                alive = set(active)
                for group in groups:
                    group.keep(alive)

    assert bool(st.h0_seen.all()), "every fact has a bare row"
    h0, delta = st.h0, st.delta  # h0 comes from blocks 0..z, which always run in the model's dtype
    z, h0 = (h0 + delta).to(torch.float64).cpu(), h0.to(torch.float64).cpu()
    return ChunkResult(z, h0, st.steps, st.final_loss, st.final_nll, delta.norm(dim=-1).tolist(), limit.tolist(),
                       iterations, st.counts)


def compute_values(
    loaded,
    facts: Sequence[Fact],
    templates: Sequence[str],
    hp: EditHParams,
    progress: Callable[[int], None] | None = None,
    prompt_format: str = "bare",
    h0_norm_ref: torch.Tensor | None = None,
) -> ValueResult:
    """Optimise target values for ``facts`` on the current model, ``hp.v_batch_facts`` at a time, over
    the rows of ``prompt_format`` (``locate/chat.py``; the NLL is the mean over all rewriting rows).

    Returns ``z, h0: [d_out, n]`` in float64 (block output of the z-layer at the subject's last token
    of each fact's primary row: the bare one, or the chat one for ``prompt_format="chat"``).
    ``h0_norm_ref: [n]`` are the norms the δ budget is measured on instead of ‖h0‖ (``hp.budget_anchor``
    ``"clean"``: :func:`clean_h0_norms`).
    """
    if h0_norm_ref is not None and h0_norm_ref.shape != (len(facts),):
        raise ValueError(f"h0_norm_ref must have one norm per fact ({len(facts)}), got shape {tuple(h0_norm_ref.shape)}")
    t0 = time.perf_counter()
    chunks: list[ChunkResult] = []
    # one reduced-precision copy of the upper blocks' weights for the whole pass (they do not change in it)
    with frozen_parameters(loaded.model), _precision(loaded, hp):
        upper = FusedUpper.for_model(loaded, hp.z_layer, hp.v_upper_blocks, compute_dtype(loaded, hp))
        for lo in range(0, len(facts), hp.v_batch_facts):
            chunk = facts[lo : lo + hp.v_batch_facts]
            ref = None if h0_norm_ref is None else h0_norm_ref[lo : lo + hp.v_batch_facts]
            chunks.append(_optimise_chunk(loaded, chunk, templates, hp, prompt_format, ref, upper))
            if progress is not None:
                progress(len(chunk))
    return ValueResult(
        z=torch.cat([c.z for c in chunks]).T.contiguous(),
        h0=torch.cat([c.h0 for c in chunks]).T.contiguous(),
        steps=[x for c in chunks for x in c.steps],
        loss=[x for c in chunks for x in c.loss],
        nll=[x for c in chunks for x in c.nll],
        seconds=time.perf_counter() - t0,
        iterations=max(c.iterations for c in chunks),
        delta_norms=[x for c in chunks for x in c.delta_norm],
        budget_norms=[x for c in chunks for x in c.budget_norm],
        **{k: sum(c.counts[k] for c in chunks) for k in _COUNTS},
    )


def clean_h0_norms(loaded, facts: Sequence[Fact], hp: EditHParams, base_weights: dict[int, torch.Tensor],
                   prompt_format: str = "bare") -> torch.Tensor:
    """‖h0_f‖ ``[n]`` at the z-layer on each fact's primary row with the edited layers set to
    ``base_weights`` (``{layer: W₀ [d_out, d_in]}`` in math layout): the unedited model's norms, which
    ``hp.budget_anchor="clean"`` measures the δ budget on. The model's weights are restored afterwards,
    also on error."""
    adapter = loaded.adapter
    edited = {l: adapter.weight(l).detach().clone() for l in base_weights}
    primary = ContextRows.build(loaded.tokenizer, facts, ["{}"], formats(prompt_format)[0])
    try:
        for l, w in base_weights.items():
            adapter.set_weight(l, w)
        h = read_keys(loaded, primary, [], z_layer=hp.z_layer, batch_rows=hp.key_batch_rows).z_hidden
    finally:
        for l, w in edited.items():
            adapter.set_weight(l, w)
    return h.to(torch.float64).norm(dim=0).cpu()  # z_hidden: [d_out, n]


__all__ = ["KL_PROMPT", "ChunkResult", "ValueResult", "clean_h0_norms", "compute_dtype", "compute_values", "delta_budget",
           "upper_blocks_dtype"]
