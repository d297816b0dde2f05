"""The scored positions' losses with their closed-form gradient (locate/head_loss.py) against autograd."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqedit.locate.head_loss import head_losses, label_misses


def _reference(z, labels, ref):
    logp = torch.log_softmax(z, -1)
    n = labels.shape[0]
    nll = -logp[:n].gather(1, labels[:, None])[:, 0]
    rest = logp[n:]
    r = rest.detach() if ref is None else ref
    kl = (rest.exp() * (rest - r)).sum(-1)
    return nll, kl


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 6), k=st.integers(0, 5), vocab=st.integers(2, 40), seed=st.integers(0, 10_000),
       scale=st.floats(0.1, 20.0), with_ref=st.booleans())
def test_values_and_gradient_match_autograd(n, k, vocab, seed, scale, with_ref) -> None:
    g = torch.Generator().manual_seed(seed)
    m = n + k
    z = (torch.randn(m, vocab, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    ref = torch.log_softmax(torch.randn(k, vocab, generator=g, dtype=torch.float64) * scale, -1) if with_ref else None
    w_nll = torch.randn(n, generator=g, dtype=torch.float64)
    w_kl = torch.randn(k, generator=g, dtype=torch.float64)

    nll, kl, logp_kl = head_losses(z, labels, ref)
    (grad,) = torch.autograd.grad((nll * w_nll).sum() + (kl * w_kl).sum(), z, allow_unused=True)
    nll_r, kl_r = _reference(z, labels, ref)
    (grad_r,) = torch.autograd.grad((nll_r * w_nll).sum() + (kl_r * w_kl).sum(), z, allow_unused=True)
    torch.testing.assert_close(nll, nll_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, kl_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logp_kl, torch.log_softmax(z, -1)[n:].detach())
    assert not logp_kl.requires_grad
    if grad_r is None:
        grad_r = torch.zeros_like(z)
    torch.testing.assert_close(grad, grad_r, rtol=1e-9, atol=1e-10)
    if ref is None:  # a row against its own distribution: no KL, no KL gradient
        assert bool((kl.abs() < 1e-12).all())


def test_only_one_loss_used() -> None:
    z = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 2, 3])
    ref = torch.log_softmax(torch.randn(2, 11, dtype=torch.float64), -1)
    nll, _, _ = head_losses(z, labels, ref)
    (grad,) = torch.autograd.grad(nll.sum(), z)
    (grad_r,) = torch.autograd.grad(_reference(z, labels, ref)[0].sum(), z)
    torch.testing.assert_close(grad, grad_r)
    assert bool((grad[3:] == 0).all())


def test_label_misses_are_the_same_on_logits_and_log_probabilities() -> None:
    z = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.2, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    for margin in (0.0, 0.5, 1.5):
        assert torch.equal(label_misses(z, labels, margin), label_misses(torch.log_softmax(z, -1), labels, margin))
    assert label_misses(z, labels, 0.0).tolist() == [0.0, 1.0, 0.0]
    assert label_misses(z, labels, 1.5).tolist() == [0.0, 1.0, 1.0]  # a lead of 1.0 is not enough
