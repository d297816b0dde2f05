"""The value optimisation's losses at its scored positions, with a hand-written gradient.

The scored positions are few (a few hundred per iteration) but each carries a whole vocabulary row
(49,152 for SmolLM2), so the loss's element-wise work over ``[m, V]`` costs as much as a block's
matrix products. Autograd through ``log_softmax → gather / exp · (logp − ref) · sum → split`` makes
about ten passes over ``[m, V]`` in the backward pass (a zero-filled scatter for the gather, one per
factor of the KL, the log-softmax backward, a concatenation for the split). :class:`HeadLoss` writes the
gradient once, from what its forward kept, since the gradient of both losses with respect to the
logits is closed-form:

    NLL_i = −log p_i[y_i]           ∂NLL_i/∂z_i = p_i − onehot(y_i)
    KL_i  = Σ_v p_iv (log p_iv − r_iv)   ∂KL_i/∂z_i = p_i ⊙ (log p_i − r_i − KL_i)

with ``p_i = softmax(z_i)`` and ``r_i`` a fixed reference log-distribution.
"""

from __future__ import annotations

import torch


class HeadLoss(torch.autograd.Function):
    """``(nll [n], kl [m − n], logp_kl [m − n, V])`` of logits ``z: [m, V]`` whose first ``n`` rows are
    scored against ``labels: [n]`` and the others against ``ref: [m − n, V]`` (log-probabilities; ``None``:
    each row's own distribution, so the KL is 0, as at the first iteration, which records it: the third
    output, detached, is the rows' log-probabilities). Computed in float32 at least (float64 logits stay float64)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor | None):
        n = labels.shape[0]
        logp = torch.log_softmax(z.float() if z.dtype.itemsize < 4 else z, -1)
        nll = -logp[:n].gather(1, labels[:, None])[:, 0]
        rest = logp[n:]
        ref_ = rest if ref is None else ref.to(rest.device, rest.dtype)
        p_rest = rest.exp()
        kl = (p_rest * (rest - ref_)).sum(-1)
        ctx.save_for_backward(logp, p_rest, labels, ref_, kl)
        ctx.in_dtype = z.dtype
        logp_kl = rest.detach()
        ctx.mark_non_differentiable(logp_kl)
        return nll, kl, logp_kl

    @staticmethod
    def backward(ctx, g_nll, g_kl, _g_logp):
        logp, p_rest, labels, ref, kl = ctx.saved_tensors
        n = labels.shape[0]
        grad = torch.empty_like(logp)
        head, rest = grad[:n], grad[n:]
        if g_nll is None:
            head.zero_()
        else:  # g·(p − onehot(y))
            torch.exp(logp[:n], out=head).mul_(g_nll[:, None]).scatter_add_(1, labels[:, None], -g_nll[:, None])
        if g_kl is None:
            rest.zero_()
        else:  # g·p ⊙ (log p − r − KL)
            torch.sub(logp[n:], ref, out=rest).sub_(kl[:, None]).mul_(p_rest).mul_(g_kl[:, None])
        return grad.to(ctx.in_dtype), None, None


def head_losses(z: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor | None = None):
    """:class:`HeadLoss` applied: ``(nll [n], kl [m − n], logp of the KL rows [m − n, V])``."""
    return HeadLoss.apply(z, labels, ref)


def label_misses(z: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """1 where the label does not lead every other token by more than ``margin`` nats, else 0, as float
    ``[m]``. ``z: [m, V]`` are logits or log-probabilities: a row's leads are the same in both."""
    z = z.detach()
    top2 = z.topk(2, dim=-1)
    lab = z.gather(1, labels[:, None])[:, 0]
    rival = torch.where(top2.indices[:, 0] == labels, top2.values[:, 1], top2.values[:, 0])
    return (lab - rival <= margin).float()


__all__ = ["HeadLoss", "head_losses", "label_misses"]
