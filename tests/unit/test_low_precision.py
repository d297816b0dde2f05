"""Reduced-precision weight copies of the value optimisation's upper blocks (locate/low_precision.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seqedit.testing import tiny_model
from seqedit.locate.low_precision import bf16_matmul_native, castable_linears, low_precision_linears
from seqedit.locate.values import compute_dtype
from seqedit.models.presets import EditHParams


def _block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8, bias=False))


def test_linears_compute_from_a_bf16_copy_and_are_restored() -> None:
    block = _block()
    x = torch.randn(5, 16)
    ref = block(x)
    with low_precision_linears([block], torch.bfloat16) as n:
        assert n == 2
        y = block(x)
        # what the copies compute: inputs and weights rounded to bfloat16, the output back in float32
        h = nn.functional.linear(x.bfloat16(), block[0].weight.bfloat16(), block[0].bias.bfloat16()).float()
        want = nn.functional.linear(nn.functional.silu(h).bfloat16(), block[2].weight.bfloat16()).float()
    assert y.dtype == torch.float32
    assert torch.equal(y, want)
    assert not torch.equal(y, ref)
    torch.testing.assert_close(y, ref, rtol=0.05, atol=0.05)
    assert all(p.dtype == torch.float32 for p in block.parameters())
    assert torch.equal(block(x), ref)  # the class's forward again
    assert all("forward" not in m.__dict__ for m in block.modules())


def test_gradients_flow_to_the_input_through_the_copies() -> None:
    block = _block()
    x = torch.randn(5, 16, requires_grad=True)
    with low_precision_linears([block], torch.bfloat16):
        (g,) = torch.autograd.grad(block(x).sum(), x)
    (g_ref,) = torch.autograd.grad(block(x).sum(), x)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, g_ref, rtol=0.05, atol=0.05)


def test_a_library_installed_forward_is_neither_bypassed_nor_lost() -> None:
    """accelerate's offload hooks move weights inside an instance ``forward``: such a layer keeps it."""
    block = _block()
    calls = []
    own = block[0].forward

    def hooked(x):
        calls.append(1)
        return own(x)

    block[0].forward = hooked
    assert castable_linears([block], torch.bfloat16) == [block[2]]
    with low_precision_linears([block], torch.bfloat16) as n:
        assert n == 1
        block(torch.randn(2, 16))
    assert calls == [1]
    assert block[0].__dict__["forward"] is hooked
    assert "forward" not in block[2].__dict__


def test_restored_after_an_error_inside() -> None:
    block = _block()
    with pytest.raises(RuntimeError, match="boom"):
        with low_precision_linears([block], torch.bfloat16):
            raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in block.modules())


def test_nothing_narrower_or_meta_is_switched() -> None:
    half = _block().to(torch.bfloat16)
    assert castable_linears([half], torch.bfloat16) == []
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    assert castable_linears([meta], torch.bfloat16) == []


def test_compute_dtype_resolution() -> None:
    lm = tiny_model("llama")
    hp = EditHParams(layers=(1, 2))
    assert compute_dtype(lm, hp) is None
    assert compute_dtype(lm, hp.override(v_compute_dtype="bfloat16")) is torch.bfloat16
    want = torch.bfloat16 if bf16_matmul_native(torch.device("cpu")) else None
    assert compute_dtype(lm, hp.override(v_compute_dtype="auto")) is want
    assert not bf16_matmul_native(torch.device("meta"))
