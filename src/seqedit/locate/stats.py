"""Σ₀ = E[k kᵀ] of FFN-out inputs over a text corpus, for all edited layers in one pass.

The pass hooks the FFN-out input of every requested layer and stops after the deepest one, so no
layer above it runs. Per-batch Gram matrices are formed and summed in float64. Results are cached
on disk per layer, keyed by model fingerprint, corpus hash, token budget, sequence length and
sampling seed; a later request computes only the layers that are missing.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..paths import cache_dir
from .tokens import pad_id_of
from .trace import capture_inputs, hooks, run_truncated, stop_after


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


def _cache_path(loaded, chash: str, layer: int, n_tokens: int, seq_len: int, seed: int) -> Path:
    # the tokenizer is part of the key: the same weights with another tokenizer see other keys
    name = f"{loaded.cache_key}-{chash[:16]}-n{n_tokens}-s{seq_len}-seed{seed}-layer{layer}.safetensors"
    return cache_dir("stats") / name


@torch.no_grad()
def collect_stats(
    loaded,
    layers: Sequence[int],
    windows: list[list[int]],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[int, LayerStats]:
    """One truncated pass over ``windows`` accumulating ``Σ k kᵀ`` at every layer of ``layers``."""
    adapter, model = loaded.adapter, loaded.model
    device = next(model.parameters()).device
    pad = pad_id_of(loaded.tokenizer)
    grams = {l: None for l in layers}
    count = 0
    # longest first keeps padding waste low inside a batch
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    for lo in range(0, len(order), batch_size):
        batch = [windows[i] for i in order[lo : lo + batch_size]]
        width = max(len(w) for w in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for r, w in enumerate(batch):
            ids[r, : len(w)] = torch.tensor(w)
            mask[r, : len(w)] = True
        dmask = mask.to(device)

        def reader(layer: int):
            def fn(x: torch.Tensor) -> None:
                k = x[dmask].to(torch.float64)
                g = k.T @ k
                grams[layer] = g if grams[layer] is None else grams[layer].add_(g)

            return fn

        handles = [capture_inputs(adapter.ffn_out(l), reader(l)) for l in layers]
        handles.append(stop_after(adapter.block(max(layers))))
        with hooks(handles):
            run_truncated(model, input_ids=ids.to(device), attention_mask=mask.long().to(device))
        count += int(mask.sum())
        if progress is not None:
            progress(int(mask.sum()))
    if count == 0:
        raise ValueError("the statistics corpus is empty: no token to estimate Σ₀ from")
    return {l: LayerStats(l, grams[l].cpu(), count) for l in layers}


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
    out: dict[int, LayerStats] = {}
    missing = []
    for l in layers:
        path = _cache_path(loaded, chash, l, n_tokens, seq_len, seed)
        if path.exists():
            t = load_file(str(path))
            out[l] = LayerStats(l, t["gram"], int(t["count"].item()))
        else:
            missing.append(l)
    if missing:
        windows = token_windows(loaded.tokenizer, corpus.read_text(encoding="utf-8"), n_tokens, seq_len, seed)
        if on_total is not None:
            on_total(sum(len(w) for w in windows))
        t0 = time.perf_counter()
        fresh = collect_stats(loaded, missing, windows, batch_size, progress)
        for l, st in fresh.items():
            path = _cache_path(loaded, chash, l, n_tokens, seq_len, seed)
            tensors = {"gram": st.gram.contiguous(), "count": torch.tensor([st.count], dtype=torch.int64)}
            meta = {"layer": str(l), "corpus_sha256": chash, "seconds": f"{time.perf_counter() - t0:.2f}"}
            atomic_write(path, lambda tmp, tensors=tensors, meta=meta: save_file(tensors, tmp, metadata=meta))
            out[l] = st
    return {l: out[l] for l in layers}
