"""Σ₀ statistics: equal to a direct computation, truncated forward, and the per-layer disk cache."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from seqedit.locate import stats as stats_mod
from seqedit.locate.stats import LayerStats, collect_stats, layer_stats, token_windows
from seqedit.models.load import LoadedModel, wrap_model
from seqedit.testing import tiny_model, tiny_tokenizer

LAYERS = (1, 2)
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "Michael Jordan plays the sport of basketball. The capital of Italy is Rome. "
    "In 1969 the first humans walked on the Moon, and water boils at one hundred degrees.\n"
)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 12, encoding="utf-8")
    return path


@pytest.fixture
def cold_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEQEDIT_CACHE", str(cache))
    return cache


def manual_sigma0(lm: LoadedModel, windows: list[list[int]], layer: int, batch_size: int = 1) -> torch.Tensor:
    """Float64 ``XᵀX / N`` over the FFN-out inputs at the non-pad positions of a full forward.

    Windows go longest first in right-padded batches of ``batch_size`` (with 1: no padding at all).
    """
    grabbed: list[torch.Tensor] = []
    handle = lm.adapter.ffn_out(layer).register_forward_pre_hook(lambda _m, a: grabbed.append(a[0]))
    d_in = lm.adapter.dims(layer)[1]
    gram, count = torch.zeros(d_in, d_in, dtype=torch.float64), 0
    ordered = sorted(windows, key=len, reverse=True)
    try:
        for lo in range(0, len(ordered), batch_size):
            batch = ordered[lo : lo + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for r, w in enumerate(batch):
                ids[r, : len(w)] = torch.tensor(w)
                mask[r, : len(w)] = True
            grabbed.clear()
            with torch.no_grad():
                lm.model(input_ids=ids, attention_mask=mask.long())
            x = grabbed[0][mask].to(torch.float64)
            gram += x.T @ x
            count += x.shape[0]
    finally:
        handle.remove()
    return gram / count


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sigma0_equals_direct_computation_and_ignores_padding(family: str) -> None:
    lm = tiny_model(family)
    ids = lm.tokenizer(TEXT * 3, add_special_tokens=False)["input_ids"]
    windows = [ids[:40], ids[40:57], ids[57:62], ids[62:102], ids[102:103]]  # ragged: padded batches
    got = collect_stats(lm, LAYERS, windows, batch_size=3)
    alone = collect_stats(lm, LAYERS, windows, batch_size=1)
    for layer in LAYERS:
        st = got[layer]
        assert isinstance(st, LayerStats) and st.count == alone[layer].count == sum(map(len, windows))
        assert st.gram.dtype == torch.float64 and st.sigma0.shape == (64, 64)
        assert rel_err(st.sigma0, manual_sigma0(lm, windows, layer, batch_size=3)) < 1e-10
        unpadded = manual_sigma0(lm, windows, layer, batch_size=1)
        assert rel_err(alone[layer].sigma0, unpadded) < 1e-10
        # padded batches differ from unpadded rows by float32 rounding only: pads are not counted
        assert rel_err(st.sigma0, unpadded) < 1e-6
        assert torch.equal(st.sigma0, st.sigma0.T)
        assert float(torch.linalg.eigvalsh(st.sigma0).min()) > -1e-12 * float(st.sigma0.trace())


def test_layer_stats_reads_the_sampled_windows(corpus: Path, cold_cache: Path) -> None:
    lm = tiny_model("qwen2")
    windows = token_windows(lm.tokenizer, corpus.read_text(encoding="utf-8"), 300, 64, seed=0)
    assert sum(map(len, windows)) >= 300 and all(len(w) <= 64 for w in windows)
    got = layer_stats(lm, LAYERS, corpus, n_tokens=300, seq_len=64)
    assert list(got) == list(LAYERS)
    for layer in LAYERS:
        assert got[layer].count == sum(map(len, windows))
        assert rel_err(got[layer].sigma0, manual_sigma0(lm, windows, layer, batch_size=16)) < 1e-10


def test_forward_stops_after_the_deepest_layer() -> None:
    lm = tiny_model("llama")
    calls = {l: 0 for l in range(lm.adapter.n_layers)}
    handles = [
        lm.adapter.block(l).register_forward_hook(lambda *_a, l=l: calls.__setitem__(l, calls[l] + 1))
        for l in calls
    ]
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    try:
        collect_stats(lm, LAYERS, [ids[:30], ids[30:50], ids[50:60]], batch_size=2)
    finally:
        for h in handles:
            h.remove()
    assert calls == {0: 2, 1: 2, 2: 2, 3: 0}


def test_cache_hit_and_only_missing_layers_computed(
    corpus: Path, cold_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = tiny_model("llama")
    computed: list[tuple[int, ...]] = []
    real = stats_mod.collect_stats

    def recording(loaded, layers, *args, **kwargs):
        computed.append(tuple(layers))
        return real(loaded, layers, *args, **kwargs)

    monkeypatch.setattr(stats_mod, "collect_stats", recording)
    first = layer_stats(lm, LAYERS, corpus, n_tokens=300, seq_len=64)
    assert computed == [LAYERS]
    assert len(list((cold_cache / "stats").glob("*.safetensors"))) == len(LAYERS)

    def refuse(*_a, **_k):
        raise AssertionError("collect_stats ran although every layer is cached")

    monkeypatch.setattr(stats_mod, "collect_stats", refuse)
    again = layer_stats(lm, LAYERS, corpus, n_tokens=300, seq_len=64)
    for layer in LAYERS:
        assert torch.equal(again[layer].gram, first[layer].gram) and again[layer].count == first[layer].count

    monkeypatch.setattr(stats_mod, "collect_stats", recording)
    more = layer_stats(lm, (*LAYERS, 3), corpus, n_tokens=300, seq_len=64)
    assert computed == [LAYERS, (3,)]
    assert list(more) == [*LAYERS, 3]
    assert torch.equal(more[1].gram, first[1].gram) and more[3].count == first[1].count


def test_another_corpus_is_another_cache_entry(
    corpus: Path, tmp_path: Path, cold_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = tiny_model("llama")
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper() * 12, encoding="utf-8")
    a = layer_stats(lm, (1,), corpus, n_tokens=300, seq_len=64)
    calls: list[int] = []
    real = stats_mod.collect_stats
    monkeypatch.setattr(stats_mod, "collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    b = layer_stats(lm, (1,), other, n_tokens=300, seq_len=64)
    assert calls == [1]
    assert len(list((cold_cache / "stats").glob("*.safetensors"))) == 2
    assert not torch.equal(a[1].gram, b[1].gram)


def test_another_tokenizer_is_another_cache_entry(corpus: Path, cold_cache: Path) -> None:
    lm = tiny_model("llama")
    with_bos = wrap_model(tiny_model("llama").model, tiny_tokenizer(add_bos=True), "tiny-llama-bos")
    assert with_bos.fingerprint == lm.fingerprint  # same weights, different token windows
    plain = layer_stats(lm, (1,), corpus, n_tokens=300, seq_len=64)
    bos = layer_stats(with_bos, (1,), corpus, n_tokens=300, seq_len=64)
    windows = token_windows(with_bos.tokenizer, corpus.read_text(encoding="utf-8"), 300, 64)
    assert windows[0][0] == with_bos.tokenizer.bos_token_id
    assert not torch.equal(plain[1].gram, bos[1].gram)
    assert rel_err(bos[1].sigma0, manual_sigma0(with_bos, windows, 1, batch_size=16)) < 1e-10


def test_missing_corpus_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-corpus.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        layer_stats(tiny_model("llama"), LAYERS, missing, n_tokens=100)


def test_empty_corpus_is_a_clear_error(tmp_path: Path, cold_cache: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        layer_stats(tiny_model("llama"), LAYERS, empty, n_tokens=100)
