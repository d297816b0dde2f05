"""The rows of a continuously batched greedy decode: one left-padded KV cache that rows join and leave
between decode steps.

Rows join as a group: their prompts are left-padded and prefilled together in a cache of their own,
then both caches are padded on the left to one length and concatenated on the batch axis. Rows leave
by selection on the batch axis, and columns that are padding in every row left are dropped. Padding
columns are masked and every row's positions count only its real tokens, so a row decodes as it would
alone (up to the rounding of differently shaped products, as in any batched decode).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..locate.tokens import pad_id_of, pad_left
from ..models.cache import cache_arg, returned_cache
from ..models.load import LoadedModel

__all__ = ["DecodeRows", "prefill", "step"]


@dataclass
class DecodeRows:
    """``B`` rows decoding together.

    ``cache``: the KV cache of ``T`` columns, ``mask: [B, T]`` (1 where a column holds a real token
    of that row), ``next_ids: [B]`` the greedy token each row feeds at its next step (already chosen,
    not yet in the cache), ``joinable``: whether other rows can be merged in (every cache layer is a
    plain full-attention layer whose tensors can be padded and concatenated).
    """

    cache: DynamicCache
    mask: Tensor
    next_ids: Tensor
    joinable: bool

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    def merge(self, other: DecodeRows) -> DecodeRows:
        """These rows followed by ``other``'s, in one cache (both must be :attr:`joinable`)."""
        if not (self.joinable and other.joinable):
            raise ValueError("these decode rows cannot be merged (a cache layer is not a full-attention DynamicLayer)")
        width = max(self.mask.shape[1], other.mask.shape[1])
        layers = []
        for a, b in zip(self.cache.layers, other.cache.layers, strict=True):
            layers.append((torch.cat([_left_pad(a.keys, width), _left_pad(b.keys, width)]),
                           torch.cat([_left_pad(a.values, width), _left_pad(b.values, width)])))
        mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(other.mask, width, dim=1)])
        return DecodeRows(DynamicCache(ddp_cache_data=layers), mask, torch.cat([self.next_ids, other.next_ids]), True)

    def select(self, keep: list[int]) -> DecodeRows:
        """Only the rows ``keep`` (indices, in that order), without the columns no kept row uses."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask[idx]
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else mask.shape[1]
        if self.joinable:
            layers = [(layer.keys[idx, :, first:], layer.values[idx, :, first:]) for layer in self.cache.layers]
            cache = DynamicCache(ddp_cache_data=layers)
        else:  # a cache of another kind keeps its columns (its layers may hold more than keys and values)
            cache, first = self.cache, 0
            cache.batch_select_indices(idx)
        return DecodeRows(cache, mask[:, first:], self.next_ids[idx], self.joinable)


def _left_pad(x: Tensor, width: int, dim: int = 2) -> Tensor:
    """``x`` with zeros prepended on ``dim`` up to ``width``."""
    missing = width - x.shape[dim]
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _joinable(cache: DynamicCache) -> bool:
    return all(type(layer) is DynamicLayer for layer in cache.layers)


@torch.no_grad()
def prefill(lm: LoadedModel, prompts: list[list[int]]) -> DecodeRows:
    """The rows of ``prompts`` (token ids, each non-empty), left-padded, with their first greedy token."""
    # left padding: every row's last prompt token is at the same column
    ids, mask = pad_left(prompts, pad_id_of(lm.tokenizer))
    device = lm.input_device
    mask = mask.to(device)
    cache = DynamicCache(config=lm.model.config)
    logits = _forward(lm, ids.to(device), mask, _positions(mask), cache)
    return DecodeRows(cache, mask, logits.argmax(-1), _joinable(cache))


@torch.no_grad()
def step(lm: LoadedModel, rows: DecodeRows) -> DecodeRows:
    """Feed every row its ``next_ids`` token; the rows one column longer, with their next greedy token."""
    position = rows.mask.sum(dim=1, keepdim=True)  # 0-based: the number of real tokens before it
    mask = torch.cat([rows.mask, rows.mask.new_ones((rows.size, 1))], dim=1)
    # the logits (and so next_ids) may sit on the last device of a model spread over several
    logits = _forward(lm, rows.next_ids[:, None].to(mask.device), mask, position, rows.cache)
    return DecodeRows(rows.cache, mask, logits.argmax(-1), rows.joinable)


def _positions(mask: Tensor) -> Tensor:
    """Position ids of a left-padded prompt block, as ``generate`` makes them (padding at 1)."""
    pos = mask.cumsum(dim=1) - 1
    return pos.masked_fill(mask == 0, 1)


def _forward(lm: LoadedModel, ids: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache) -> Tensor:
    """Logits ``[B, V]`` of the last column, the cache extended in place."""
    model = lm.model
    keep = {"logits_to_keep": 1} if _keeps_logits(type(model).forward) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep,
                **cache_arg(model, cache))
    if returned_cache(out) is not cache:
        raise RuntimeError("the model returned another KV cache than the one it was given")
    return out.logits[:, -1].float()


@functools.lru_cache(maxsize=16)
def _keeps_logits(forward) -> bool:
    """Whether the forward can unembed the last column only (a prefill needs no other logits)."""
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
