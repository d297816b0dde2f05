"""Batched teacher-forced scoring of target strings after prompts.

``score_targets`` returns, for each (prompt, target) pair, the length-normalised mean NLL of the
target tokens (nats/token; CounterFact's comparison statistic), their total log-probability, and
whether every target token is the argmax (exact match). Rows are ``prompt ids + target ids``
concatenated (no re-tokenisation across the boundary), right-padded, scored in batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..locate.tokens import pad_id_of, pad_right, target_ids


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
    device = next(model.parameters()).device
    pad = pad_id_of(loaded.tokenizer)
    for lo in range(0, len(rows), batch_rows):
        ids, mask = pad_right([list(r) for r in rows[lo : lo + batch_rows]], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        yield lo, torch.log_softmax(logits.float(), -1)


@torch.no_grad()
def last_logits(loaded, ids: torch.Tensor, mask: torch.Tensor, last: Sequence[int]) -> torch.Tensor:
    """Logits ``[B, V]`` (float32, CPU) at position ``last[b]`` of each right-padded row ``ids [B, T]``.

    With an architecture adapter only those positions go through the vocabulary head (see
    :func:`target_log_probs`); otherwise the full logits are formed and indexed.
    """
    model = loaded.model
    device = next(model.parameters()).device
    rows = torch.arange(ids.shape[0])
    pos = torch.as_tensor(list(last))
    adapter = getattr(loaded, "adapter", None)
    if adapter is None:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return logits[rows.to(logits.device), pos.to(logits.device)].float().cpu()
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    return adapter.unembed(hidden[rows.to(hidden.device), pos.to(hidden.device)]).float().cpu()


@torch.no_grad()
def target_log_probs(
    loaded, rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, tuple[int, ...]]], batch_rows: int
) -> Iterator[list[torch.Tensor]]:
    """Per batch of rows: each row's log-probs ``[len(target), V]`` (float32, CPU) at its target positions.

    With an architecture adapter the vocabulary head runs only at those positions (final hidden states
    of ``model.base_model``, then ``adapter.unembed``, as the value optimisation does): for prompts of
    ~30 tokens and 1–3 target tokens that is ~10× less head work and memory than full logits. Models
    without an adapter (hand-built test models) go through :func:`forward_log_probs`.
    """
    adapter = getattr(loaded, "adapter", None)
    if adapter is None:
        for lo, logp in forward_log_probs(loaded, rows, batch_rows):
            chunk = spans[lo : lo + len(logp)]
            yield [logp[r, s - 1 : s - 1 + len(t)].cpu() for r, (s, t) in enumerate(chunk)]
        return
    model = loaded.model
    device = next(model.parameters()).device
    pad = pad_id_of(loaded.tokenizer)
    for lo in range(0, len(rows), batch_rows):
        chunk = spans[lo : lo + batch_rows]
        ids, mask = pad_right([list(r) for r in rows[lo : lo + batch_rows]], pad)
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        r_idx = [r for r, (_, t) in enumerate(chunk) for _ in t]
        p_idx = [s - 1 + j for s, t in chunk for j in range(len(t))]
        logp = torch.log_softmax(adapter.unembed(hidden[r_idx, p_idx]).float(), -1).cpu()
        yield list(logp.split([len(t) for _, t in chunk]))


@torch.no_grad()
def score_targets(
    loaded, pairs: Sequence[tuple[str, str]], batch_rows: int = 64
) -> list[TargetScore]:
    """Score ``target`` after ``prompt`` for every ``(prompt, target)`` pair on the current model."""
    rows, spans = target_rows(loaded, pairs)
    out: list[TargetScore] = []
    done = 0
    for per_row in target_log_probs(loaded, rows, spans, batch_rows):
        for logp, (_, t) in zip(per_row, spans[done : done + len(per_row)]):
            want = torch.tensor(t)
            lp = logp[torch.arange(len(t)), want]
            exact = bool((logp.argmax(-1) == want).all())
            out.append(TargetScore(float(-lp.mean()), float(lp.sum()), exact))
        done += len(per_row)
    return out


@torch.no_grad()
def greedy_completions(loaded, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy continuation of each prompt (decoded, special tokens skipped)."""
    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    outs = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt").to(device)
        gen = model.generate(
            **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id_of(tok)
        )
        outs.append(tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return outs
