"""The rows of the value optimisation (``locate/values.py``): per fact its rewriting rows in every prompt
format and its KL row, each split at the subject's last token into a *prefix* (run once, kept as a KV
cache) and a *suffix* (run at every iteration), grouped by suffix length to keep padding small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..facts import Fact
from .chat import answer_ids, encode_row, formats
from .tokens import encode_prompt, pad_id_of, pad_left
from ..models.cache import cache_arg, returned_cache
from .fused_blocks import FusedUpper, GroupInput, attention_mask
from .trace import LowerBlocksReplay, StopForward, hooks, stop_after

KL_PROMPT = "{} is a"  # the KL row: the distribution right after the subject, which δ should keep


@dataclass
class Row:
    """One row of a fact: token ids split at the subject's last token (``prefix`` before it, ``suffix``
    from it on), the suffix positions scored and what they predict."""

    fact: int  # index within the chunk
    prefix: list[int]
    suffix: list[int]
    label_pos: list[int]  # suffix positions whose logits predict `labels`
    labels: list[int]
    kl: bool
    bare: bool  # the fact's primary row (format formats[0], template 0): h0 is read there
    cont: int = -1  # suffix position after the whole target (continuation KL), or -1
    cont_id: int = -1  # its reference's index in the chunk: fact · formats + format


def build_rows(tokenizer, facts: Sequence[Fact], templates: Sequence[str], prompt_format: str = "bare",
                continuation: bool = False) -> list[Row]:
    """Per fact: its rewriting rows (formats × templates, the primary row first), then its KL row. With
    ``continuation`` each format's template-free row also runs through the target's last token, whose
    output is the continuation-KL position."""
    rows: list[Row] = []
    fmts = formats(prompt_format)
    for fi, fact in enumerate(facts):
        for gi, fmt in enumerate(fmts):
            tgt = list(answer_ids(tokenizer, fmt, fact.target))
            for ti, tmpl in enumerate(templates):
                cont = continuation and ti == 0
                enc = encode_row(tokenizer, fmt, tmpl, fact.prompt, fact.subject)
                full = list(enc.ids) + (tgt if cont else tgt[:-1])
                s = enc.subject_last
                first = len(enc.ids) - 1 - s  # suffix position predicting tgt[0]
                row = Row(fi, full[:s], full[s:], [first + j for j in range(len(tgt))], tgt, False,
                          gi == 0 and ti == 0)
                if cont:
                    row.cont, row.cont_id = len(full) - 1 - s, fi * len(fmts) + gi
                rows.append(row)
        enc = encode_prompt(tokenizer, "{}", KL_PROMPT, fact.subject)
        s = enc.subject_last
        rows.append(Row(fi, list(enc.ids[:s]), [enc.ids[s]], [0], [], True, False))
    return rows


class PrefixCache:
    """Per-layer prefix keys/values ``[rows, heads, P, head_dim]``, left-padded with zeros to ``P``.

    Built in sub-batches of similar prefix length (padding costs a full forward per padded token);
    the zero padding is masked out by the attention mask. Hands out a fresh ``DynamicCache`` view of
    the same tensors for every pass, so suffix passes never grow it.
    """

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kv = kv

    @classmethod
    def build(cls, base, rows: list[Row], P: int, pad: int, device) -> "PrefixCache":
        kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for sub in length_groups([len(r.prefix) for r in rows]):
            width = max(len(rows[i].prefix) for i in sub)
            if width == 0:
                continue
            ids, mask = pad_left([rows[i].prefix for i in sub], pad)
            with torch.no_grad():
                cache = returned_cache(base(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=(torch.cumsum(mask, 1) - 1).clamp(min=0).to(device),
                    use_cache=True,
                ))
            index = torch.tensor(sub, device=device)
            if kv is None:
                kv = [
                    tuple(t.new_zeros((len(rows), t.shape[1], P, t.shape[3])) for t in (layer.keys, layer.values))
                    for layer in cache.layers
                ]
            for (k_all, v_all), layer in zip(kv, cache.layers):
                k_all[index.to(k_all.device), :, P - width :] = layer.keys
                v_all[index.to(v_all.device), :, P - width :] = layer.values
        return cls(kv)

    def select(self, index: torch.Tensor) -> None:
        self.kv = [(k[index.to(k.device)], v[index.to(v.device)]) for k, v in self.kv]

    def fresh(self):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=self.kv)


def length_groups(lengths: list[int], max_groups: int = 4) -> list[list[int]]:
    """Partition row indices into ≤ ``max_groups`` groups of similar suffix length.

    Rows are right-padded to their group's longest suffix, so the partition minimises the padded
    token count Σ_g max_len_g · |g| (a small dynamic programme over the distinct lengths).
    """
    distinct = sorted(set(lengths))
    count = [sum(1 for x in lengths if x == u) for u in distinct]
    m, k = len(distinct), min(max_groups, len(distinct))
    prefix = [0]
    for c in count:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[g][j]: cost of covering distinct[:j] with g groups; cut[g][j]: start of the last group
    best = [[inf] * (m + 1) for _ in range(k + 1)]
    cut = [[0] * (m + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for g in range(1, k + 1):
        for j in range(1, m + 1):
            for i in range(j):
                c = best[g - 1][i] + distinct[j - 1] * (prefix[j] - prefix[i])
                if c < best[g][j]:
                    best[g][j], cut[g][j] = c, i
    g = min(range(1, k + 1), key=lambda gg: best[gg][m])
    bounds, j = [], m
    while g > 0:
        i = cut[g][j]
        bounds.append((distinct[i], distinct[j - 1]))
        j, g = i, g - 1
    return [[r for r, x in enumerate(lengths) if lo <= x <= hi] for lo, hi in reversed(bounds)]


class RowGroup:
    """Rows of similar suffix length: their prefix KV cache, suffix batch and lower-block replay."""

    def __init__(self, loaded, rows: list[Row], z_layer: int):
        base, pad = loaded.model.base_model, pad_id_of(loaded.tokenizer)
        self.device = loaded.input_device
        self.rows = rows
        P = max(len(r.prefix) for r in rows)
        S = max(len(r.suffix) for r in rows)
        pre_mask = torch.zeros((len(rows), P), dtype=torch.long)
        self.suf_ids = torch.full((len(rows), S), pad, dtype=torch.long)
        suf_mask = torch.zeros((len(rows), S), dtype=torch.long)
        for i, r in enumerate(rows):
            # left-padded prefix, right-padded suffix: the two meet without a gap
            pre_mask[i, P - len(r.prefix) :] = 1
            self.suf_ids[i, : len(r.suffix)] = torch.tensor(r.suffix)
            suf_mask[i, : len(r.suffix)] = 1
        self.suf_pos = pre_mask.sum(1)[:, None] + torch.arange(S)[None, :]
        self.full_mask = torch.cat([pre_mask, suf_mask], 1)
        self.tokens = suf_mask.sum(1)
        self.prefix = PrefixCache.build(base, rows, P, pad, self.device) if P > 0 else None
        self.replay = LowerBlocksReplay(loaded.adapter, z_layer)
        # the fused path's attention inputs (mask, cos, sin), made on its first pass
        self.fused_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def keep(self, alive: set[int]) -> None:
        """Drop the rows of facts that stopped."""
        idx = [i for i, r in enumerate(self.rows) if r.fact in alive]
        if len(idx) == len(self.rows):
            return
        sel = torch.tensor(idx, dtype=torch.long)
        self.rows = [self.rows[i] for i in idx]
        self.suf_ids, self.suf_pos = self.suf_ids[sel], self.suf_pos[sel]
        self.full_mask, self.tokens = self.full_mask[sel], self.tokens[sel]
        if self.rows:
            self.replay.select(sel.to(self.device))
            if self.prefix is not None:
                self.prefix.select(sel.to(self.device))
            if self.fused_inputs is not None:
                self.fused_inputs = tuple(t[sel.to(t.device)] for t in self.fused_inputs)

    def forward(self, loaded, z_layer: int, inject) -> torch.Tensor:
        """Suffix pass with ``inject(out, group)`` hooked on block ``z_layer``; returns final hidden states."""
        handle = loaded.adapter.block(z_layer).register_forward_hook(lambda _m, _a, out: inject(out, self))
        with hooks([handle]), self.replay.skipping():
            return self._suffix_pass(loaded).last_hidden_state

    def _suffix_pass(self, loaded):
        """The base model over the suffix rows, attending to the prefix cache (a fresh view of it)."""
        dev, base = self.device, loaded.model.base_model
        return base(
            input_ids=self.suf_ids.to(dev),
            attention_mask=self.full_mask.to(dev),
            position_ids=self.suf_pos.to(dev),
            **cache_arg(base, self.prefix.fresh() if self.prefix is not None else None),
            use_cache=self.prefix is not None,
        )

    def fused_input(self, loaded, z_layer: int, upper: FusedUpper, shift) -> GroupInput:
        """This group's input to ``upper`` (:meth:`FusedUpper.forward_groups`): block ``z_layer``'s output,
        read once through the model's modules (:meth:`record_lower`), with ``shift(h, group)`` adding δ."""
        if self.replay.hidden is None:
            self.record_lower(loaded, z_layer)
        h = shift(self.replay.hidden, self)
        if self.fused_inputs is None:
            mask = attention_mask(self.full_mask.to(upper.device), self.suf_ids.shape[1])
            self.fused_inputs = (mask, *upper.rotary_tables(h.detach(), self.suf_pos))
        return GroupInput(h, self.prefix.kv if self.prefix is not None else None, *self.fused_inputs)

    def forward_fused(self, loaded, z_layer: int, upper: FusedUpper, shift) -> torch.Tensor:
        """The pass of :meth:`forward` with the blocks above ``z_layer`` run by ``upper``; returns final
        hidden states ``[rows, S, d]``."""
        return upper.forward_groups([self.fused_input(loaded, z_layer, upper, shift)])[0]

    def record_lower(self, loaded, z_layer: int) -> None:
        """Run blocks ``0..z_layer`` on the suffix (after the prefix cache) and record block ``z_layer``'s
        output in the replay; the blocks above do not run."""
        block = loaded.adapter.block(z_layer)
        handles = [block.register_forward_hook(self.replay.recorder()), stop_after(block)]  # hooks run in order
        with hooks(handles), torch.no_grad():
            try:
                self._suffix_pass(loaded)
            except StopForward:
                pass


__all__ = ["KL_PROMPT", "PrefixCache", "Row", "RowGroup", "build_rows", "length_groups"]
