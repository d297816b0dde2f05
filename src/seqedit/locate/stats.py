"""Σ₀ = E[k kᵀ] of FFN-out inputs over a text corpus, for all edited layers in one pass.

The pass hooks the FFN-out input of every requested layer and stops after the deepest one, so no
layer above it runs. Gram matrices are accumulated in float64 on the device each layer computes on,
in chunks of keys, so memory does not grow with the corpus; a configuration that cannot fit is
refused before any work. Under ``torch.distributed`` the batches are split over the ranks and one
all-reduce sums the Gram matrices (data-parallel Σ₀ for corpora of tens of millions of tokens).
Results are cached on disk per layer, keyed by model fingerprint, corpus hash, token budget, sequence length and
sampling seed; a later request computes only the layers that are missing.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..errors import PlacementError
from ..models.placement import free_bytes
from ..paths import build_lock, cache_dir
from .tokens import pad_id_of
from .trace import capture_inputs, hooks, run_truncated, stop_after


DEFAULT_CHUNK_TOKENS = 4096  # keys cast to float64 at a time: 4096 × d_in × 8 bytes (470 MB at d_in = 14,336)


@dataclass
class LayerStats:
    """``sigma0 = S / count`` with ``S = Σ_tokens k kᵀ`` (float64, ``[d_in, d_in]``)."""

    layer: int
    gram: torch.Tensor
    count: int

    @property
    def sigma0(self) -> torch.Tensor:
        return self.gram / self.count


def corpus_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def token_windows(tokenizer, text: str, n_tokens: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """Seeded sample of ``seq_len``-token windows of ``text`` totalling ≥ ``n_tokens`` (or all of it).

    Windows carry the tokenizer's own leading special tokens (a BOS where it adds one).
    """
    head = tokenizer("", add_special_tokens=True)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = max(1, seq_len - len(head))
    windows = [head + ids[i : i + body] for i in range(0, len(ids), body)]
    random.Random(seed).shuffle(windows)
    out, total = [], 0
    for w in windows:
        if total >= n_tokens:
            break
        out.append(w)
        total += len(w)
    return out


def _cache_stem(loaded, chash: str, n_tokens: int, seq_len: int, seed: int) -> Path:
    # the tokenizer is part of the key: the same weights with another tokenizer see other keys
    return cache_dir("stats") / f"{loaded.cache_key}-{chash[:16]}-n{n_tokens}-s{seq_len}-seed{seed}"


def _read_cached(paths: dict[int, Path]) -> dict[int, LayerStats]:
    """The layers of ``paths`` whose Σ₀ is in the cache."""
    out = {}
    for l, path in paths.items():
        if path.exists():
            t = load_file(str(path))
            out[l] = LayerStats(l, t["gram"], int(t["count"].item()))
    return out


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_launched_group() -> tuple[int, int]:
    """Join the process group a launcher describes in the environment (``torchrun``, ``accelerate
    launch``: ``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``), NCCL on GPUs and gloo
    otherwise, unless one is initialised already. Returns ``(rank, world size)``; ``(0, 1)`` unlaunched."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _world()


def stats_memory(loaded, layers: Sequence[int], chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict[torch.device, int]:
    """Bytes the accumulators of :func:`collect_stats` hold per device: one float64 ``[d_in, d_in]``
    Gram matrix per layer (on the device the layer computes on) and one float64 ``[chunk_tokens, d_in]``
    chunk of keys. Independent of the corpus size."""
    need: dict[torch.device, int] = {}
    for l in layers:
        dev, d_in = loaded.adapter.device(l), loaded.adapter.dims(l)[1]
        need[dev] = need.get(dev, 0) + 8 * d_in * d_in
    for dev in need:
        widest = max(loaded.adapter.dims(l)[1] for l in layers if loaded.adapter.device(l) == dev)
        need[dev] += 8 * chunk_tokens * widest
    return need


def check_stats_fit(loaded, layers: Sequence[int], chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
    """Raise :class:`~seqedit.errors.PlacementError` before any work when the accumulators cannot fit."""
    for dev, need in stats_memory(loaded, layers, chunk_tokens).items():
        free = free_bytes(dev)
        if free is not None and need > free:
            raise PlacementError(
                f"Σ₀ for layers {list(layers)} needs {need / 2**30:.2f} GiB of float64 accumulators on {dev}, "
                f"{free / 2**30:.2f} GiB are free: estimate fewer layers at a time, or lower chunk_tokens"
            )


@torch.no_grad()
def collect_stats(
    loaded,
    layers: Sequence[int],
    windows: list[list[int]],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[int, LayerStats]:
    """One truncated pass over ``windows`` accumulating ``Σ k kᵀ`` at every layer of ``layers``.

    Each layer's Gram matrix is accumulated in float64 on the device the layer computes on, from keys
    cast ``chunk_tokens`` rows at a time, so the peak memory does not depend on the corpus size
    (:func:`stats_memory`). Under an initialised ``torch.distributed`` process group (``torchrun`` /
    ``accelerate launch``; gloo on CPUs, NCCL on GPUs), rank ``r`` of ``w`` reads every ``w``-th batch
    from the ``r``-th and one all-reduce sums the Gram matrices and counts: every rank returns Σ₀ of
    all ``windows``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    check_stats_fit(loaded, layers, chunk_tokens)
    adapter, model = loaded.adapter, loaded.model
    device = loaded.input_device
    pad = pad_id_of(loaded.tokenizer)
    rank, world = _world()
    grams = {l: torch.zeros(adapter.dims(l)[1], adapter.dims(l)[1], dtype=torch.float64, device=adapter.device(l))
             for l in layers}
    # longest first keeps padding waste low inside a batch; ranks take alternate batches
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    starts = list(range(0, len(order), batch_size))[rank::world]
    count = 0
    for lo in starts:
        batch = [windows[i] for i in order[lo : lo + batch_size]]
        width = max(len(w) for w in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for r, w in enumerate(batch):
            ids[r, : len(w)] = torch.tensor(w)
            mask[r, : len(w)] = True

        def reader(layer: int, mask: torch.Tensor = mask):  # this batch's hooks: its own mask
            def fn(x: torch.Tensor) -> None:
                keys = x[mask.to(x.device)]
                g = grams[layer]
                for c in range(0, keys.shape[0], chunk_tokens):
                    k = keys[c : c + chunk_tokens].to(device=g.device, dtype=torch.float64)
                    g.addmm_(k.T, k)

            return fn

        handles = [capture_inputs(adapter.ffn_out(l), reader(l)) for l in layers]
        handles.append(stop_after(adapter.block(max(layers))))
        with hooks(handles):
            run_truncated(model, input_ids=ids.to(device), attention_mask=mask.long().to(device))
        count += int(mask.sum())
        if progress is not None:
            progress(int(mask.sum()))
    if world > 1:
        count = _all_reduce_sum(grams, count)
    if count == 0:
        raise ValueError("the statistics corpus is empty: no token to estimate Σ₀ from")
    return {l: LayerStats(l, grams[l].cpu(), count) for l in layers}


def _all_reduce_sum(grams: dict[int, torch.Tensor], count: int) -> int:
    """Sum every rank's Gram matrices in place (float64) and return the total token count."""
    import torch.distributed as dist

    first = next(iter(grams.values()))
    total = torch.tensor([count], dtype=torch.float64, device=first.device)
    for g in grams.values():
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def layer_stats(
    loaded,
    layers: Sequence[int],
    corpus: str | Path,
    n_tokens: int = 100_000,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[int, LayerStats]:
    """Σ₀ statistics for ``layers``, from the disk cache where present, else one pass for the rest."""
    corpus = Path(corpus)
    if not corpus.is_file():
        raise FileNotFoundError(f"statistics corpus {corpus} does not exist")
    chash = corpus_hash(corpus)
    stem = _cache_stem(loaded, chash, n_tokens, seq_len, seed)

    def path(l: int) -> Path:
        return stem.with_name(f"{stem.name}-layer{l}.safetensors")

    out = _read_cached({l: path(l) for l in layers})
    missing = [l for l in layers if l not in out]
    if not missing:
        return {l: out[l] for l in layers}
    rank, world = _world()
    # Ranks of one process group compute Σ₀ together (a lock would deadlock them); lone processes that
    # miss the same entry at once compute it once: the others wait, then read the cache.
    lock = build_lock(stem) if world == 1 else nullcontext()
    with lock:
        out.update(_read_cached({l: path(l) for l in missing}))
        missing = [l for l in missing if l not in out]
        if missing:
            check_stats_fit(loaded, missing)  # before the corpus is even tokenised
            windows = token_windows(loaded.tokenizer, corpus.read_text(encoding="utf-8"), n_tokens, seq_len, seed)
            if on_total is not None:
                on_total(sum(len(w) for w in windows))
            t0 = time.perf_counter()
            fresh = collect_stats(loaded, missing, windows, batch_size, progress)
            for l, st in fresh.items():
                out[l] = st
                if rank != 0:  # every rank holds the reduced Σ₀; one writes the cache
                    continue
                tensors = {"gram": st.gram.contiguous(), "count": torch.tensor([st.count], dtype=torch.int64)}
                meta = {"layer": str(l), "corpus_sha256": chash, "seconds": f"{time.perf_counter() - t0:.2f}",
                        "ranks": str(world)}
                atomic_write(path(l), lambda tmp, tensors=tensors, meta=meta: save_file(tensors, tmp, metadata=meta))
            if world > 1:
                import torch.distributed as dist

                dist.barrier()  # the cache is complete before any rank goes on
    return {l: out[l] for l in layers}
