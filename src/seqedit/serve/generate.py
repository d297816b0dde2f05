"""OpenAI-style text completions on the live edited model (greedy at ``temperature`` below
:data:`GREEDY_BELOW`, else sampled with ``temperature`` and ``top_p``); ``stop`` strings cut the text,
as OpenAI does."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.load import LoadedModel

__all__ = ["Completion", "GREEDY_BELOW", "complete", "cut_at_stop"]

# Logits divided by a tinier temperature overflow to inf and sampling fails (found by the schema fuzz);
# at such temperatures sampling is greedy decoding anyway.
GREEDY_BELOW = 1e-4


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: int


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def prompt_ids(lm: LoadedModel, prompt: str) -> list[int]:
    """Token ids of ``prompt``; an empty prompt starts from the BOS (or EOS) token."""
    ids = lm.tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    if not ids:
        tok = lm.tokenizer
        ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    return list(ids)


@torch.no_grad()
def complete(lm: LoadedModel, ids: list[int], *, max_tokens: int, temperature: float, top_p: float, n: int,
             stops: list[str], seed: int | None = None) -> list[Completion]:
    """``n`` completions of the prompt ``ids`` with at most ``max_tokens`` new tokens each."""
    tok = lm.tokenizer
    device = next(lm.model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    sample = temperature >= GREEDY_BELOW
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    if sample and seed is not None:
        torch.manual_seed(seed)
    eos = tok.eos_token_id
    out = lm.model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
        num_return_sequences=n if sample else 1, pad_token_id=eos if tok.pad_token_id is None else tok.pad_token_id,
        eos_token_id=eos, top_k=None, **kwargs,
    )
    result = []
    rows = out[:, len(ids):].tolist()
    for seq in rows if sample else rows * n:  # greedy: the n completions are one
        ended = eos is not None and eos in seq
        if ended:
            seq = seq[: seq.index(eos)]
        text, stopped = cut_at_stop(tok.decode(seq, skip_special_tokens=True), stops)
        result.append(Completion(text, "stop" if (ended or stopped) else "length", len(seq)))
    return result
