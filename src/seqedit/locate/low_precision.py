"""Reduced-precision matrix products for the value optimisation, with weights cast once.

The value optimisation runs the blocks above the z-layer a dozen times over the same rows, with every
parameter frozen. Their linear layers are the bulk of its FLOPs, and on a CPU with AMX (or a GPU with
tensor cores) a bfloat16 GEMM runs 4–7× faster than a float32 one on these shapes. Autocast loses that
gain on CPU: it re-casts every frozen weight at every call and runs the element-wise work in reduced
precision too. Here each linear layer of those blocks gets a reduced-precision copy of its weight,
made once when the context opens, and computes ``y = (x in dtype) @ Wᵀ`` returned in the model's
dtype: norms, rotary, attention, residual additions, the unembedding, the losses, δ and Adam stay
in float32, and the blocks up to the z-layer (which give h0) are untouched, so h0 is exact.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .trace import shadow_forwards


def _cast_forward(module: nn.Linear, dtype: torch.dtype, last: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    weight = module.weight.detach().to(dtype)
    bias = None if module.bias is None else module.bias.detach().to(dtype)
    out_dtype = module.weight.dtype

    def forward(x: torch.Tensor) -> torch.Tensor:
        # q/k/v (and gate/up) read the same input one after the other: cast it once. ``last`` holds the
        # input itself, so an identity match cannot be a recycled id.
        if last.get("x") is not x:
            last["x"], last["cast"] = x, x.to(dtype)
        return nn.functional.linear(last["cast"], weight, bias).to(out_dtype)

    return forward


def castable_linears(blocks: Sequence[nn.Module], dtype: torch.dtype) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``blocks`` a ``dtype`` copy helps: wider than ``dtype``, materialised
    (not on the meta device), and with no forward of their own installed by a library (accelerate's
    offload hooks move weights inside ``forward``; shadowing it would bypass them)."""
    out = []
    for block in blocks:
        for m in block.modules():
            if (isinstance(m, nn.Linear) and m.weight.device.type != "meta"
                    and m.weight.dtype.itemsize > dtype.itemsize and "forward" not in m.__dict__):
                out.append(m)
    return out


@contextmanager
def low_precision_linears(blocks: Sequence[nn.Module], dtype: torch.dtype) -> Iterator[int]:
    """Inside the block, the linear layers of ``blocks`` (:func:`castable_linears`) compute in ``dtype``
    from weight copies made on entry; yields how many were switched. The copies reflect the weights at
    entry: the caller keeps the weights fixed for the duration (the value optimisation does)."""
    linears = castable_linears(blocks, dtype)
    last: dict = {}
    try:
        with shadow_forwards([(m, _cast_forward(m, dtype, last)) for m in linears]):
            yield len(linears)
    finally:
        last.clear()


def bf16_matmul_native(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively here (CUDA with bf16 support; a CPU with AMX-BF16 or
    AVX512-BF16). Elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch.cpu's probes are private; a torch without them counts as "no"
        probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return any(p is not None and bool(p()) for p in probes)
    return False


__all__ = ["bf16_matmul_native", "castable_linears", "low_precision_linears"]
