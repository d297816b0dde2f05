"""Batched teacher-forced scoring of target strings after prompts.

``score_targets`` returns, for each (prompt, target) pair, the length-normalised mean NLL of the
target tokens (nats/token; CounterFact's comparison statistic), their total log-probability, and
whether every target token is the argmax (exact match). Rows are ``prompt ids + target ids``
concatenated (no re-tokenisation across the boundary), right-padded, scored in batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from ..locate.tokens import pad_id_of, pad_left, pad_right, target_ids
from ..models.cache import cache_arg, returned_cache
from ..models.placement import input_device
from ..progress import Phase, ProgressCallback, ProgressEvent, emit

T = TypeVar("T")


@dataclass(frozen=True)
class TargetScore:
    mean_nll: float  # nats per target token
    logprob: float  # log p(target | prompt), summed over tokens
    exact: bool  # every target token is the greedy choice

    @property
    def prob(self) -> float:
        """p(target | prompt), the product over its tokens."""
        return float(torch.tensor(self.logprob).exp())


def target_rows(
    loaded, pairs: Sequence[tuple[str, str]]
) -> tuple[list[list[int]], list[tuple[int, tuple[int, ...]]]]:
    """Rows ``ids(prompt) + ids(" " + target)`` and each row's ``(prompt length, target ids)``.

    The logit predicting target token ``j`` sits at position ``prompt length + j − 1``.
    """
    tok = loaded.tokenizer
    rows, spans = [], []
    for prompt, target in pairs:
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        t = target_ids(tok, target)
        rows.append(list(p) + list(t))
        spans.append((len(p), t))
    return rows, spans


def forward_log_probs(
    loaded, rows: Sequence[Sequence[int]], batch_rows: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first row index, log-probs [B, T, V] float32 on the model's device)`` per batch.

    Rows are token id lists, right-padded with the tokenizer's pad id (masked out). Log-probs stay on
    the device so callers gather what they need without copying a ``B×T×V`` tensor to the host.
    """
    model = loaded.model
    device = input_device(model)
    pad = pad_id_of(loaded.tokenizer)
    for lo in range(0, len(rows), batch_rows):
        ids, mask = pad_right([list(r) for r in rows[lo : lo + batch_rows]], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        yield lo, torch.log_softmax(logits.float(), -1)


def length_batches(lengths: Sequence[int], batch_rows: int, tokens_per_row: int = 64) -> list[list[int]]:
    """Row indices grouped into batches of similar length, longest first.

    A batch holds at most ``batch_rows`` rows and at most ``batch_rows * tokens_per_row`` padded tokens
    (a single longer row still gets a batch of its own). Sorting matters on a CPU, where the forward is
    compute-bound: for the general tasks (14- to 527-token prompts) batching in file order pads 21.5k
    real tokens to 65.5k. Longest first, so the largest batch (peak memory) comes first.
    """
    if batch_rows < 1 or tokens_per_row < 1:
        raise ValueError(f"batch_rows and tokens_per_row must be >= 1, got {batch_rows}, {tokens_per_row}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    budget = batch_rows * tokens_per_row
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        # rows come longest first, so the batch's padded width is its first row's length
        if b is None or len(b) >= batch_rows or (len(b) + 1) * lengths[b[0]] > budget:
            batches.append([i])
        else:
            b.append(i)
    return batches


def shared_head(rows: Sequence[Sequence[int]], limit: int, min_len: int = 8) -> int:
    """Length of the token prefix common to all ``rows``, at most ``limit``; 0 if shorter than ``min_len``
    (a few shared tokens are not worth a separate cached pass)."""
    if not rows or limit <= 0:
        return 0
    first, n = rows[0], min(limit, *(len(r) for r in rows))
    for r in rows[1:]:
        n = next((j for j in range(n) if r[j] != first[j]), n)
    return n if n >= min_len else 0


def _forward_after_head(base, head: Sequence[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B, S, d]`` of rows ``head + ids[b]`` (``ids``/``mask``: the right-padded
    tails), with ``head`` run once and its KV cache shared by the batch."""
    from transformers import DynamicCache

    dev, c, (B, S) = ids.device, len(head), ids.shape
    cache = returned_cache(base(input_ids=torch.tensor([list(head)], device=dev), use_cache=True))
    shared = DynamicCache(ddp_cache_data=[(layer.keys.expand(B, -1, -1, -1), layer.values.expand(B, -1, -1, -1))
                                          for layer in cache.layers])
    full_mask = torch.cat([torch.ones((B, c), dtype=mask.dtype, device=dev), mask], 1)
    pos = (c + torch.arange(S, device=dev)).expand(B, S)
    return base(input_ids=ids, attention_mask=full_mask, position_ids=pos, **cache_arg(base, shared),
                use_cache=True).last_hidden_state


def shared_rows(
    rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, tuple[int, ...]]]
) -> tuple[list[list[int]], list[int]]:
    """The rows that have to be run, and for each input row the index of the one that serves it.

    Row ``i`` reads its target log-probs at positions ``s_i - 1 … s_i + len(t_i) - 2``, so it needs only
    ``rows[i][:s_i + len(t_i) - 1]``; when that is a prefix of another row with the same prompt, that
    row's forward serves both. A prompt scored against a new and a true target of one token each (most
    CounterFact targets, every A–D option) then costs one row instead of two. Served rows keep their own
    positions, because they share the prompt length. Each run row is cut to what it needs.
    """
    if len(rows) != len(spans):
        raise ValueError(f"shared_rows: {len(rows)} rows but {len(spans)} spans")
    hosts: list[list[int]] = []
    host_of = [0] * len(rows)
    by_prompt: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> indices into ``hosts``
    need = []
    for i, (row, (s, t)) in enumerate(zip(rows, spans)):
        if s < 1 or not t or len(row) < s + len(t) - 1:
            raise ValueError(f"row {i}: a target needs a non-empty prompt and at least one token inside the row")
        need.append(list(row[: s + len(t) - 1]))
    for i in sorted(range(len(rows)), key=lambda i: -len(need[i])):  # longest first: they can host the rest
        n, group = need[i], by_prompt.setdefault(tuple(rows[i][: spans[i][0]]), [])
        h = next((h for h in group if hosts[h][: len(n)] == n), None)
        if h is None:
            h = len(hosts)
            hosts.append(n)
            group.append(h)
        host_of[i] = h
    return hosts, host_of


@torch.no_grad()
def map_target_log_probs(
    loaded,
    rows: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, tuple[int, ...]]],
    reduce: Callable[[int, torch.Tensor], T],
    batch_rows: int,
    progress: ProgressCallback | None = None,
) -> list[T]:
    """``[reduce(i, logp_i) for each row i]``, where ``logp_i: [len(target_i), V]`` (float32, CPU) are the
    log-probs at row ``i``'s target positions. Results are in input order; rows run in length-sorted
    batches (:func:`length_batches`) and each row's log-probs are reduced as soon as its batch is done,
    so memory holds one batch of vocabulary rows, not all of them.

    Rows whose targets can be read off another row with the same prompt are not run (:func:`shared_rows`;
    ~half of CounterFact's rows). With an architecture adapter the vocabulary head runs only at the
    target positions (final hidden states of ``model.base_model``, then ``adapter.unembed``, as the value
    optimisation does): for prompts of ~30 tokens and 1–3 target tokens that is ~10× less head work and
    memory than full logits. Models without an adapter (hand-built test models) form full logits. With
    an adapter, the token prefix that all rows of a batch share (:func:`shared_head`: a chat template's
    system prompt and turn markers, ~30 of the embedded model's ~45-token chat rows) runs once and its
    KV cache serves the batch. ``progress`` gets a :attr:`~seqedit.progress.Phase.SCORING` bar over the
    rows (a scoring pass of ten thousand CounterFact records takes minutes).
    """
    model = loaded.model
    device = input_device(model)
    pad = pad_id_of(loaded.tokenizer)
    adapter = getattr(loaded, "adapter", None)
    hosts, host_of = shared_rows(rows, spans)
    served: list[list[int]] = [[] for _ in hosts]
    for i, h in enumerate(host_of):
        served[h].append(i)
    out: list[Any] = [None] * len(rows)
    emit(progress, ProgressEvent(Phase.SCORING, total=len(rows), start=True))
    for batch in length_batches([len(h) for h in hosts], batch_rows):
        members = [i for h in batch for i in served[h]]
        slot = {h: b for b, h in enumerate(batch)}
        # rows through a chat template share a long head (system prompt, turn markers): run it once
        limit = min(spans[i][0] for i in members) - 1
        shared = 0 if adapter is None else shared_head([hosts[h] for h in batch], limit)
        ids, mask = pad_right([hosts[h][shared:] for h in batch], pad)
        ids, mask = ids.to(device), mask.to(device)
        r_idx = [slot[host_of[i]] for i in members for _ in spans[i][1]]
        p_idx = [spans[i][0] - 1 + j - shared for i in members for j in range(len(spans[i][1]))]
        if adapter is None:
            picked = model(input_ids=ids, attention_mask=mask).logits[r_idx, p_idx]
        elif shared:
            hidden = _forward_after_head(model.base_model, hosts[batch[0]][:shared], ids, mask)
            picked = adapter.unembed(hidden[r_idx, p_idx])
        else:
            picked = adapter.unembed(model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[r_idx, p_idx])
        logp = torch.log_softmax(picked.float(), -1).cpu()
        for i, lp in zip(members, logp.split([len(spans[i][1]) for i in members])):
            out[i] = reduce(i, lp)
        emit(progress, ProgressEvent(Phase.SCORING, advance=len(members), total=len(rows)))
    return out


@torch.no_grad()
def score_targets(
    loaded, pairs: Sequence[tuple[str, str]], batch_rows: int = 64, progress: ProgressCallback | None = None
) -> list[TargetScore]:
    """Score ``target`` after ``prompt`` for every ``(prompt, target)`` pair on the current model."""
    rows, spans = target_rows(loaded, pairs)
    return map_target_log_probs(loaded, rows, spans, lambda i, logp: target_score(spans[i][1], logp), batch_rows,
                                progress)


def target_score(target: Sequence[int], logp: torch.Tensor) -> TargetScore:
    """The :class:`TargetScore` of target ids ``target`` from their log-probs ``logp: [len(target), V]``."""
    want = torch.tensor(list(target))
    lp = logp[torch.arange(len(want)), want]
    return TargetScore(float(-lp.mean()), float(lp.sum()), bool((logp.argmax(-1) == want).all()))


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


@torch.no_grad()
def greedy_continuations(loaded, rows: Sequence[Sequence[int]], max_new_tokens: int = 8,
                         batch_rows: int = 32) -> list[str]:
    """Greedy continuation of each row of token ids (decoded, special tokens skipped), in input order.

    Rows run in length-sorted batches of ``batch_rows``, left-padded (``generate`` derives positions
    from the attention mask); a row's tokens after its first end-of-sequence token are dropped, so
    each result is what generating that row alone gives (up to float round-off of the padded batch).
    One row at a time was 8x slower on the embedded model: it made the chat evaluation's greedy answers dominate a run.
    """
    tok, model = loaded.tokenizer, loaded.model
    device = input_device(model)
    pad, eos = pad_id_of(tok), _eos_ids(model, tok)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(r) == 0 for r in rows):
        raise ValueError("greedy_continuations: a row is empty (there is nothing to continue)")
    outs: list[str] = [""] * len(rows)
    for batch in length_batches([len(r) for r in rows], batch_rows, tokens_per_row=10**9):
        ids, mask = pad_left([list(rows[i]) for i in batch], pad)
        width = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        for b, i in enumerate(batch):
            new = gen[b, width:].tolist()
            cut = next((j + 1 for j, t in enumerate(new) if t in eos), len(new))
            outs[i] = tok.decode(new[:cut], skip_special_tokens=True)
    return outs


def greedy_completions(loaded, prompts: Sequence[str], max_new_tokens: int = 8, batch_rows: int = 32) -> list[str]:
    """Greedy continuation of each prompt (special tokens added as the tokenizer does)."""
    tok = loaded.tokenizer
    return greedy_continuations(loaded, [tok(p)["input_ids"] for p in prompts], max_new_tokens, batch_rows)
