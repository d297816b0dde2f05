"""A fused forward of the decoder blocks above the z-layer, for the value optimisation (issue 34).

Every iteration of the value optimisation runs the blocks above the z-layer forward and backward over
the same suffix rows. Through the model's own modules that pass is dominated by element-wise work,
not by its matrix products: ``DynamicCache`` concatenation, grouped-query head repetition, separate
q/k/v and gate/up products with a cast each, RMSNorm, rotary and SiLU as separate kernels
(``docs/performance.md``). :func:`fused_block` is one Llama-family decoder block written as a single
function of tensors (q/k/v and gate/up as one product each, SDPA with native grouped-query attention,
the prefix's keys and values passed in). Run eagerly it is already faster; compiled once with
``torch.compile`` (inductor, dynamic shapes: one graph for every block, row count and length) the
element-wise work is fused into the matrix products' neighbours.

Supported: ``model_type`` llama, mistral and qwen2 (q/k/v biases included), SiLU-gated MLP, RMSNorm,
no Qwen3-style q/k norms, every upper block and the final norm on one device, no accelerate hooks.
Anything else uses the model's modules (:func:`unsupported` says why). The fused block computes what
the modules compute, up to the order of floating-point operations (``tests/unit/test_fused_blocks.py``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.presets import UPPER_BLOCK_MODES

__all__ = ["FusedUpper", "UPPER_BLOCK_MODES", "attention_mask", "fused_block", "unsupported"]

_FAMILIES = ("llama", "mistral", "qwen2")
_log = logging.getLogger(__name__)


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """RMSNorm as Llama computes it: statistics in float32, the weight applied in ``x``'s dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _linear(x: Tensor, w: Tensor, b: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    y = F.linear(x.to(w.dtype), w, b)
    return y.to(out_dtype)


def fused_block(h: Tensor, k_pre: Tensor | None, v_pre: Tensor | None, mask: Tensor, cos: Tensor, sin: Tensor,
                ln1: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, w_o: Tensor, ln2: Tensor, w_gu: Tensor,
                w_down: Tensor, eps: float, n_heads: int, n_kv: int, head_dim: int, scale: float) -> Tensor:
    """One pre-norm Llama-family block over suffix rows ``h: [r, S, d]`` that follow a cached prefix.

    ``k_pre, v_pre: [r, n_kv, P, head_dim]`` the prefix's (rotated) keys and values, or ``None``;
    ``mask: [r, 1, S, P + S]`` bool, True where a query may attend; ``cos, sin: [r, 1, S, head_dim]``
    at the suffix positions; ``w_qkv: [(n_heads + 2·n_kv)·head_dim, d]`` (q, k, v stacked),
    ``w_gu: [2·d_ff, d]`` (gate, up stacked). Products run in the weights' dtype; the residual stream,
    norms, rotary and attention in ``h``'s.
    """
    r, s, _ = h.shape
    dt = h.dtype
    qkv = _linear(_rms(h, ln1, eps), w_qkv, b_qkv, dt)
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], -1)
    q = _rotate(q.view(r, s, n_heads, head_dim).transpose(1, 2), cos, sin)
    k = _rotate(k.view(r, s, n_kv, head_dim).transpose(1, 2), cos, sin)
    v = v.view(r, s, n_kv, head_dim).transpose(1, 2)
    if k_pre is not None:
        k, v = torch.cat([k_pre.to(dt), k], 2), torch.cat([v_pre.to(dt), v], 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=n_kv != n_heads)
    h = h + _linear(o.transpose(1, 2).reshape(r, s, n_heads * head_dim), w_o, None, dt)
    gate, up = _linear(_rms(h, ln2, eps), w_gu, None, dt).chunk(2, -1)
    return h + _linear(F.silu(gate) * up, w_down, None, dt)


def unsupported(loaded, z_layer: int) -> str | None:
    """Why the fused forward cannot run the blocks above ``z_layer`` of ``loaded``'s model, or ``None``."""
    cfg = loaded.model.config
    family = getattr(cfg, "model_type", "?")
    if family not in _FAMILIES:
        return f"model_type {family!r} (fused blocks cover {', '.join(_FAMILIES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "mlp_bias", False):
        return "MLP biases"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    adapter = loaded.adapter
    blocks = [adapter.block(i) for i in range(z_layer + 1, adapter.n_layers)]
    if not blocks:
        return "no block above the z-layer"
    modules = [adapter.final_norm, *blocks]
    devices = {p.device for m in modules for p in m.parameters()}
    if any(d.type == "meta" for d in devices):
        return "upper-block weights on the meta device (offloaded)"
    if len(devices) != 1:
        return f"upper blocks on {len(devices)} devices"
    for block in blocks:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in names):
            return f"block {type(block).__name__} is not a Llama-family block"
        if hasattr(attn, "q_norm") or getattr(attn, "sliding_window", None):
            return "q/k norms or sliding-window attention"
        if attn.o_proj.bias is not None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "an output-projection bias or a non-gated MLP"
        if any(hasattr(m, "_hf_hook") for m in block.modules()):
            return "accelerate hooks on the upper blocks (offloaded weights)"
    return None


@dataclass(frozen=True)
class _Weights:
    ln1: Tensor
    w_qkv: Tensor
    b_qkv: Tensor | None
    w_o: Tensor
    ln2: Tensor
    w_gu: Tensor
    w_down: Tensor


_compiled: dict[str, Callable | None] = {}  # device type and dtypes -> the compiled block, None where compiling failed
_compile_lock = threading.Lock()


def _compiled_block(device: torch.device, dtype: torch.dtype, wdtype: torch.dtype) -> Callable | None:
    """``torch.compile(fused_block, dynamic=True)``, probed once per process, device type and dtypes with a
    forward and backward pass on small tensors; ``None`` (logged) where inductor cannot compile here."""
    key = f"{device.type}:{dtype}:{wdtype}"
    with _compile_lock:
        if key not in _compiled:
            fn = torch.compile(fused_block, dynamic=True)
            try:
                r, s, p, nh, nkv, hd, d, ff = 3, 3, 2, 4, 2, 8, 32, 48
                g = torch.Generator().manual_seed(0)

                def rand(*shape, dt=dtype):
                    return torch.randn(*shape, generator=g).to(device, dt)

                h = rand(r, s, d).requires_grad_(True)
                mask = torch.ones(r, 1, s, p + s, dtype=torch.bool, device=device).tril(p)
                out = fn(h, rand(r, nkv, p, hd), rand(r, nkv, p, hd), mask, rand(r, 1, s, hd), rand(r, 1, s, hd),
                         rand(d), rand((nh + 2 * nkv) * hd, d, dt=wdtype), None, rand(d, nh * hd, dt=wdtype), rand(d),
                         rand(2 * ff, d, dt=wdtype), rand(d, ff, dt=wdtype), 1e-5, nh, nkv, hd, hd**-0.5)
                torch.autograd.grad(out.sum(), h)
                _compiled[key] = fn
            except Exception as exc:  # inductor needs a C++ compiler on CPU, triton on CUDA
                _log.warning("torch.compile of the fused upper blocks failed here (%s: %s); running them eagerly",
                             type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                _compiled[key] = None
        return _compiled[key]


class FusedUpper:
    """The blocks above the z-layer and the final norm, run by :func:`fused_block` from weight copies
    made once (in ``dtype``, or the model's own); build with :meth:`for_model`."""

    def __init__(self, loaded, z_layer: int, dtype: torch.dtype | None, compile: bool):
        adapter = loaded.adapter
        cfg = loaded.model.config
        self.blocks = list(range(z_layer + 1, adapter.n_layers))
        norm = adapter.final_norm
        self.norm_w = norm.weight.detach()
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", getattr(cfg, "rms_norm_eps", 1e-6))))
        attn0 = adapter.block(self.blocks[0]).self_attn
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(attn0, "head_dim", cfg.hidden_size // self.n_heads))
        self.scale = float(getattr(attn0, "scaling", self.head_dim**-0.5))
        self.rotary = loaded.model.base_model.rotary_emb
        self.weights = [self._copy(adapter.block(i), dtype) for i in self.blocks]
        self.device = self.norm_w.device
        self.dtype = self.norm_w.dtype
        wdtype = self.weights[0].w_qkv.dtype
        self.block_fn: Callable = (_compiled_block(self.device, self.dtype, wdtype) if compile else None) or fused_block
        self.compiled = self.block_fn is not fused_block

    @staticmethod
    def _copy(block: nn.Module, dtype: torch.dtype | None) -> _Weights:
        a, m = block.self_attn, block.mlp

        def cat(*lins: nn.Linear) -> Tensor:
            w = torch.cat([lin.weight.detach() for lin in lins])
            return w.to(dtype) if dtype is not None else w

        biases = [lin.bias for lin in (a.q_proj, a.k_proj, a.v_proj)]
        b_qkv = None
        if any(b is not None for b in biases):
            b_qkv = torch.cat([b.detach() if b is not None else lin.weight.new_zeros(lin.weight.shape[0])
                               for b, lin in zip(biases, (a.q_proj, a.k_proj, a.v_proj))])
            b_qkv = b_qkv.to(dtype) if dtype is not None else b_qkv
        return _Weights(block.input_layernorm.weight.detach(), cat(a.q_proj, a.k_proj, a.v_proj), b_qkv, cat(a.o_proj),
                        block.post_attention_layernorm.weight.detach(), cat(m.gate_proj, m.up_proj), cat(m.down_proj))

    @classmethod
    def for_model(cls, loaded, z_layer: int, mode: str, dtype: torch.dtype | None) -> FusedUpper | None:
        """The fused forward for ``mode`` (``hp.v_upper_blocks``), or ``None`` for the model's modules.

        ``"modules"``: ``None``. ``"auto"``: the eager fused block where the model is supported, else
        ``None``. ``"fused"``/``"compiled"``: that path, or ``ValueError`` naming why the model is not
        supported (``"compiled"`` runs eagerly, with a warning, where inductor cannot compile here)."""
        if mode not in UPPER_BLOCK_MODES:
            raise ValueError(f"v_upper_blocks must be one of {', '.join(UPPER_BLOCK_MODES)}, got {mode!r}")
        if mode == "modules":
            return None
        why = unsupported(loaded, z_layer)
        if why is not None:
            if mode == "auto":
                return None
            raise ValueError(f"v_upper_blocks={mode!r} cannot run this model's upper blocks: {why}")
        # "auto" runs the fused block eagerly: on a 2-core CPU the compiled block is no faster at 2 threads
        # (values of 100 facts: 23.1 s compiled, 23.2 s eager, 31.4 s through the modules) and costs 20-70 s
        # of compile cold; at 1 thread it is (33.6 s against 41.9 s), so compiling stays an explicit choice
        return cls(loaded, z_layer, dtype, compile=mode == "compiled")

    def rotary_tables(self, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos, sin: [r, 1, S, head_dim]`` at ``positions: [r, S]`` (the model's own rotary embedding)."""
        cos, sin = self.rotary(h, positions.to(h.device))
        return cos[:, None].to(h.dtype), sin[:, None].to(h.dtype)

    def forward(self, h: Tensor, prefix_kv: list[tuple[Tensor, Tensor]] | None, mask: Tensor, cos: Tensor,
                sin: Tensor) -> Tensor:
        """Final hidden states ``[r, S, d]`` (after the final norm) from block z's output ``h: [r, S, d]``.

        ``prefix_kv[ℓ] = (k, v)`` the prefix cache of every layer (``PrefixCache.kv``), or ``None``."""
        for layer, w in zip(self.blocks, self.weights):
            k_pre, v_pre = prefix_kv[layer] if prefix_kv is not None else (None, None)
            h = self.block_fn(h, k_pre, v_pre, mask, cos, sin, w.ln1, w.w_qkv, w.b_qkv, w.w_o, w.ln2, w.w_gu,
                              w.w_down, self.eps, self.n_heads, self.n_kv, self.head_dim, self.scale)
        return _rms(h, self.norm_w, self.eps)


def attention_mask(full_mask: Tensor, suffix_len: int) -> Tensor:
    """``[r, 1, S, P + S]`` bool from the rows' key mask ``full_mask: [r, P + S]`` (1 = a real token):
    a suffix query at position i attends to every real prefix token and the real suffix tokens ≤ i."""
    total = full_mask.shape[1]
    prefix = total - suffix_len
    causal = torch.ones(suffix_len, total, dtype=torch.bool, device=full_mask.device).tril(prefix)
    return (full_mask.bool()[:, None, None, :] & causal[None, None]).contiguous()
