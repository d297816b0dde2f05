"""Fluency (ROME's n-gram entropy of generated text, REFERENCE_NOTES §3.2) and seeded generation.

Word tokenisation uses a regex, ``\\w+|[^\\w\\s]`` (runs of word characters, and every other
non-space character on its own), instead of NLTK's ``word_tokenize``: no extra dependency, and the same
split on ordinary prose except for NLTK's special cases (contractions such as "don't" → "do", "n't",
quote normalisation). Scores are therefore close to, not bit-identical with, the official numbers.

Per text: ``H_n = −Σ f log₂ f`` over the relative frequencies of its word n-grams; the text's score is
``(2/3·H_2 + 4/3·H_3) / 2``; :func:`fluency_score` averages texts (ROME reports ×100).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from ..locate.tokens import pad_id_of
from ..models.cache import cache_arg, returned_cache
from ..models.placement import input_device

__all__ = [
    "CONSISTENCY_UNAVAILABLE",
    "fluency_score",
    "generate_texts",
    "ngram_entropy",
    "text_entropy_score",
    "word_tokenize",
]

CONSISTENCY_UNAVAILABLE = (
    "Consistency (ROME's reference score) is not computed: it is the TF-IDF cosine between the generated "
    "texts and Wikipedia snippets about other subjects with the new target, and needs "
    "attribute_snippets.json plus the fitted tfidf_vocab.json and idf.npy, none of which is available in "
    "the shared data folder (see shared/data/README.md, 'Not available')."
)

_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Regex word tokenizer (NLTK-free stand-in for ``nltk.word_tokenize``; see the module docstring)."""
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the empirical n-gram distribution of ``tokens``; 0 if there is no n-gram."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    if not counts:
        return 0.0
    f = np.array(list(counts.values()), dtype=float)
    f /= f.sum()
    return float(-(f * np.log2(f)).sum())


def text_entropy_score(text: str) -> float:
    """ROME's per-text score ``mean(2/3·H_2, 4/3·H_3)`` in bits."""
    tokens = word_tokenize(text)
    return (2 / 3 * ngram_entropy(tokens, 2) + 4 / 3 * ngram_entropy(tokens, 3)) / 2


def fluency_score(texts: Sequence[str]) -> float:
    """Mean of :func:`text_entropy_score` over ``texts`` (bits; ×100 for the paper's scale)."""
    if not texts:
        raise ValueError("no texts to score")
    return float(np.mean([text_entropy_score(t) for t in texts]))


@torch.no_grad()
def generate_texts(
    loaded,
    prompts: Sequence[str],
    max_total_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_rows: int = 32,
) -> list[str]:
    """Top-k sampled continuations, ``max_total_tokens`` tokens per row INCLUDING the prompt (ROME's
    ``max_out_len``); the decoded text includes the prompt (special tokens skipped).

    Prompts are sampled ``batch_rows`` at a time (chunks in order, one generator), LEFT-padded with
    explicit position ids and a KV cache, so each new token costs one single-position forward (a
    re-run of the whole batch per token made 100-token generation on CPU minutes per record). All rows
    of a chunk advance together; a row stops growing once it holds ``max_total_tokens`` tokens. Only
    the last position goes through the vocabulary head where the model has an architecture adapter.
    Sampling draws from a private ``torch.Generator`` seeded with ``seed`` on the CPU, so results do
    not depend on or disturb the global RNG, and rows do not depend on the device's RNG.
    """
    tok = loaded.tokenizer
    pad = pad_id_of(tok)
    gen = torch.Generator().manual_seed(seed)
    rows = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    for lo in range(0, len(rows), batch_rows):
        _sample_chunk(loaded, rows[lo : lo + batch_rows], max_total_tokens, top_k, gen, pad)
    return [tok.decode(r, skip_special_tokens=True) for r in rows]


def _sample_chunk(loaded, chunk: list[list[int]], max_total: int, top_k: int, gen: torch.Generator, pad: int) -> None:
    """Extend the id lists of ``chunk`` in place (see :func:`generate_texts`)."""
    need = [max(0, max_total - len(r)) for r in chunk]
    if not any(need):
        return
    model, adapter = loaded.model, getattr(loaded, "adapter", None)
    device = input_device(model)
    B, T = len(chunk), max(len(r) for r in chunk)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(chunk):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    past = None
    for step in range(max(need)):
        kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=True)
        if adapter is None:  # hand-built test models: plain logits
            out = model(**kw, **cache_arg(model, past))
            logits = out.logits[:, -1].float().cpu()
        else:
            out = model.base_model(**kw, **cache_arg(model.base_model, past))
            logits = adapter.unembed(out.last_hidden_state[:, -1]).float().cpu()
        past = returned_cache(out)
        top, which = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        pick = torch.multinomial(torch.softmax(top, -1), 1, generator=gen).squeeze(-1)
        nxt = which[torch.arange(B), pick]
        for b, r in enumerate(chunk):
            if step < need[b]:
                r.append(int(nxt[b]))
        ids, pos = nxt[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
