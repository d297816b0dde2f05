"""Batched teacher-forced scoring of target strings after prompts.

``score_targets`` returns, for each (prompt, target) pair, the length-normalised mean NLL of the
target tokens (nats/token; CounterFact's comparison statistic), their total log-probability, and
whether every target token is the argmax (exact match). Rows are ``prompt ids + target ids``
concatenated (no re-tokenisation across the boundary), right-padded, scored in batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


@torch.no_grad()
def score_targets(
    loaded, pairs: Sequence[tuple[str, str]], batch_rows: int = 64
) -> list[TargetScore]:
    """Score ``target`` after ``prompt`` for every ``(prompt, target)`` pair on the current model."""
    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    pad = pad_id_of(tok)
    rows, spans = [], []
    for prompt, target in pairs:
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        t = list(target_ids(tok, target))
        rows.append(p + t)
        spans.append((len(p), t))
    out: list[TargetScore] = []
    for lo in range(0, len(rows), batch_rows):
        ids, mask = pad_right(rows[lo : lo + batch_rows], pad)
        logp = torch.log_softmax(
            model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1
        ).cpu()
        for r, (start, t) in enumerate(spans[lo : lo + batch_rows]):
            pos = torch.arange(start - 1, start - 1 + len(t))
            lp = logp[r, pos, torch.tensor(t)]
            exact = bool((logp[r, pos].argmax(-1) == torch.tensor(t)).all())
            out.append(TargetScore(float(-lp.mean()), float(lp.sum()), exact))
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
