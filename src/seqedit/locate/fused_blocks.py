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
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.presets import UPPER_BLOCK_MODES

__all__ = ["FusedUpper", "GroupInput", "UPPER_BLOCK_MODES", "attention_mask", "fused_block", "packed_block", "unsupported"]

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


def packed_block(h: Tensor, parts: Sequence[tuple[int, int, Tensor | None, Tensor | None, Tensor]], cos: Tensor,
                 sin: Tensor, ln1: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, w_o: Tensor, ln2: Tensor, w_gu: Tensor,
                 w_down: Tensor, eps: float, n_heads: int, n_kv: int, head_dim: int, scale: float) -> Tensor:
    """One pre-norm Llama-family block over the suffix rows of several row groups packed into one matrix.

    ``h: [M, d]`` holds group g's rows ``[r_g, S_g, d]`` flattened, one group after the other
    (M = Σ r_g·S_g); ``parts[g] = (r_g, S_g, k_pre, v_pre, mask)``: ``k_pre, v_pre: [r_g, n_kv, P_g,
    head_dim]`` the group's prefix keys and values (rotated) or ``None``, ``mask: [r_g, 1, S_g, P_g + S_g]``
    bool, True where a query may attend; ``cos, sin: [M, 1, head_dim]`` at every packed token's position;
    ``w_qkv: [(n_heads + 2·n_kv)·head_dim, d]`` (q, k, v stacked), ``w_gu: [2·d_ff, d]`` (gate, up
    stacked). The position-wise work (norms, every product, rotary, SiLU) runs once over all M tokens,
    so the products are as tall as the step's rows allow; only attention runs per group. Products run
    in the weights' dtype; the residual stream, norms, rotary and attention in ``h``'s.
    """
    m = h.shape[0]
    dt = h.dtype
    qkv = _linear(_rms(h, ln1, eps), w_qkv, b_qkv, dt)
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], -1)
    q = _rotate(q.view(m, n_heads, head_dim), cos, sin)
    k = _rotate(k.view(m, n_kv, head_dim), cos, sin)
    v = v.view(m, n_kv, head_dim)
    outs, lo = [], 0
    for r, s, k_pre, v_pre, mask in parts:
        qg, kg, vg = (x[lo:lo + r * s].view(r, s, -1, head_dim).transpose(1, 2) for x in (q, k, v))
        lo += r * s
        if k_pre is not None:
            kg, vg = torch.cat([k_pre.to(dt), kg], 2), torch.cat([v_pre.to(dt), vg], 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale, enable_gqa=n_kv != n_heads)
        outs.append(o.transpose(1, 2).reshape(r * s, n_heads * head_dim))
    h = h + _linear(outs[0] if len(outs) == 1 else torch.cat(outs), w_o, None, dt)
    gate, up = _linear(_rms(h, ln2, eps), w_gu, None, dt).chunk(2, -1)
    return h + _linear(F.silu(gate) * up, w_down, None, dt)


def fused_block(h: Tensor, k_pre: Tensor | None, v_pre: Tensor | None, mask: Tensor, cos: Tensor, sin: Tensor,
                ln1: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, w_o: Tensor, ln2: Tensor, w_gu: Tensor,
                w_down: Tensor, eps: float, n_heads: int, n_kv: int, head_dim: int, scale: float) -> Tensor:
    """:func:`packed_block` for one row group ``h: [r, S, d]`` (``cos, sin: [r, S, head_dim]``), with only
    tensors and numbers as arguments: the function ``torch.compile`` compiles."""
    r, s, d = h.shape
    out = packed_block(h.reshape(r * s, d), [(r, s, k_pre, v_pre, mask)], cos.reshape(r * s, 1, -1),
                       sin.reshape(r * s, 1, -1), ln1, w_qkv, b_qkv, w_o, ln2, w_gu, w_down, eps, n_heads, n_kv,
                       head_dim, scale)
    return out.view(r, s, d)


@dataclass(frozen=True)
class GroupInput:
    """One row group's input to :meth:`FusedUpper.forward_groups`: block z's output with δ added
    ``h: [r, S, d]``, the prefix cache of every layer (``PrefixCache.kv``) or ``None``, the attention
    ``mask: [r, 1, S, P + S]`` (:func:`attention_mask`) and the rotary tables ``cos, sin: [r, S, head_dim]``
    (:meth:`FusedUpper.rotary_tables`)."""

    h: Tensor
    prefix_kv: list[tuple[Tensor, Tensor]] | None
    mask: Tensor
    cos: Tensor
    sin: Tensor


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
                out = fn(h, rand(r, nkv, p, hd), rand(r, nkv, p, hd), mask, rand(r, s, hd), rand(r, s, hd),
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
        """``cos, sin: [r, S, head_dim]`` at ``positions: [r, S]`` (the model's own rotary embedding)."""
        cos, sin = self.rotary(h, positions.to(h.device))
        return cos.to(h.dtype), sin.to(h.dtype)

    def forward(self, h: Tensor, prefix_kv: list[tuple[Tensor, Tensor]] | None, mask: Tensor, cos: Tensor,
                sin: Tensor) -> Tensor:
        """Final hidden states ``[r, S, d]`` (after the final norm) of one row group (:class:`GroupInput`)."""
        return self.forward_groups([GroupInput(h, prefix_kv, mask, cos, sin)])[0]

    def forward_groups(self, groups: Sequence[GroupInput]) -> list[Tensor]:
        """Final hidden states ``[r_g, S_g, d]`` (after the final norm) of every row group in ``groups``.

        Eagerly the groups run packed (:func:`packed_block`): one product per weight for all of them,
        attention per group. The compiled block takes one group per call (a graph per group count
        would recompile with every length partition)."""
        if self.compiled:
            outs = []
            for g in groups:
                h = g.h
                for layer, w in zip(self.blocks, self.weights):
                    k_pre, v_pre = g.prefix_kv[layer] if g.prefix_kv is not None else (None, None)
                    h = self.block_fn(h, k_pre, v_pre, g.mask, g.cos, g.sin, w.ln1, w.w_qkv, w.b_qkv, w.w_o, w.ln2,
                                      w.w_gu, w.w_down, self.eps, self.n_heads, self.n_kv, self.head_dim, self.scale)
                outs.append(_rms(h, self.norm_w, self.eps))
            return outs
        shapes = [(g.h.shape[0], g.h.shape[1]) for g in groups]
        d = groups[0].h.shape[-1]

        def packed(xs: list[Tensor], width: int) -> Tensor:
            return xs[0].reshape(-1, *width) if len(xs) == 1 else torch.cat([x.reshape(-1, *width) for x in xs])

        h = packed([g.h for g in groups], (d,))
        cos = packed([g.cos for g in groups], (1, self.head_dim))
        sin = packed([g.sin for g in groups], (1, self.head_dim))
        for layer, w in zip(self.blocks, self.weights):
            parts = [(r, s, *(g.prefix_kv[layer] if g.prefix_kv is not None else (None, None)), g.mask)
                     for (r, s), g in zip(shapes, groups)]
            h = packed_block(h, parts, cos, sin, w.ln1, w.w_qkv, w.b_qkv, w.w_o, w.ln2, w.w_gu, w.w_down, self.eps,
                             self.n_heads, self.n_kv, self.head_dim, self.scale)
        h = _rms(h, self.norm_w, self.eps)
        return [x.view(r, s, d) for x, (r, s) in zip(h.split([r * s for r, s in shapes]), shapes)]


def attention_mask(full_mask: Tensor, suffix_len: int) -> Tensor:
    """``[r, 1, S, P + S]`` bool from the rows' key mask ``full_mask: [r, P + S]`` (1 = a real token):
    a suffix query at position i attends to every real prefix token and the real suffix tokens ≤ i."""
    total = full_mask.shape[1]
    prefix = total - suffix_len
    causal = torch.ones(suffix_len, total, dtype=torch.bool, device=full_mask.device).tril(prefix)
    return (full_mask.bool()[:, None, None, :] & causal[None, None]).contiguous()
