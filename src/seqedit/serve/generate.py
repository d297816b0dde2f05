"""OpenAI-style text completions on the live edited model (greedy at ``temperature`` below
:data:`GREEDY_BELOW`, else sampled with ``temperature`` and ``top_p``); ``stop`` strings cut the text,
as OpenAI does. :func:`complete` returns whole completions; :func:`stream_complete` yields text as it
is generated, and its pieces add up to the same text."""

from __future__ import annotations

import queue
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..models.load import LoadedModel

__all__ = ["Completion", "GREEDY_BELOW", "TokenLogprob", "complete", "cut_at_stop", "prompt_ids", "score_prompt",
           "stream_complete"]

# Logits divided by a tinier temperature overflow to inf and sampling fails (found by the schema fuzz);
# at such temperatures sampling is greedy decoding anyway.
GREEDY_BELOW = 1e-4


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a completion: its id, text, log-probability under the model (raw logits, before
    temperature or top-p) and the ``top`` most probable alternatives at that position."""

    id: int
    text: str
    logprob: float | None  # None: the first prompt token, which nothing predicts
    top: tuple[tuple[str, float], ...] = ()
    offset: int = 0  # where its text starts in the completion (or, echoed, in prompt + completion)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None  # the tokens of ``text`` (after a stop cut), when asked


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
def _generate(lm: LoadedModel, ids: list[int], max_tokens: int, temperature: float, top_p: float, n: int,
              **extra: Any) -> torch.Tensor:
    """``[n, len(ids) + new]`` token ids (``n`` must be 1 when greedy)."""
    tok = lm.tokenizer
    input_ids = torch.tensor([ids], device=lm.input_device)
    sample = temperature >= GREEDY_BELOW
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    return lm.model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
        num_return_sequences=n, pad_token_id=tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id,
        eos_token_id=tok.eos_token_id, top_k=None, **kwargs, **extra,
    )


def _token_logprobs(tok: Any, seq: list[int], logits: list[torch.Tensor], top: int, keep_chars: int,
                    base: int = 0) -> tuple[TokenLogprob, ...]:
    """``seq[i]``'s log-probability from ``logits[i]`` (``[V]``), for the tokens that start before
    ``keep_chars`` characters of their decoded text (a stop cut drops the rest)."""
    out = []
    for i, t in enumerate(seq):
        start = len(tok.decode(seq[:i], skip_special_tokens=True))
        if start >= keep_chars:
            break
        lp = torch.log_softmax(logits[i].double(), dim=-1)
        alts = ()
        if top:
            vals, idx = lp.topk(top)
            alts = tuple((tok.decode([j]), float(v)) for j, v in zip(idx.tolist(), vals.tolist()))
        out.append(TokenLogprob(t, tok.decode([t]), float(lp[t]), alts, base + start))
    return tuple(out)


@torch.no_grad()
def score_prompt(lm: LoadedModel, ids: list[int], top: int) -> tuple[TokenLogprob, ...]:
    """The prompt's own tokens with their log-probabilities (echo): token ``i`` scored by the logits at
    ``i - 1``; the first has none. One forward pass; the caller holds the weights' read lock."""
    tok = lm.tokenizer
    logits = lm.model(input_ids=torch.tensor([ids], device=lm.input_device)).logits[0]
    scored = _token_logprobs(tok, ids[1:], list(logits[:-1]), top, 1 << 62, 0) if len(ids) > 1 else ()
    first = TokenLogprob(ids[0], tok.decode([ids[0]]), None, (), 0)
    shift = len(tok.decode(ids[:1], skip_special_tokens=True))
    return (first,) + tuple(TokenLogprob(t.id, t.text, t.logprob, t.top, t.offset + shift) for t in scored)


def complete(lm: LoadedModel, ids: list[int], *, max_tokens: int, temperature: float, top_p: float, n: int,
             stops: list[str], seed: int | None = None, logprobs: int | None = None) -> list[Completion]:
    """``n`` completions of the prompt ``ids`` with at most ``max_tokens`` new tokens each; with
    ``logprobs`` (the number of alternatives, 0..20) each carries its tokens' log-probabilities."""
    tok = lm.tokenizer
    sample = temperature >= GREEDY_BELOW
    if sample and seed is not None:
        torch.manual_seed(seed)
    extra = dict(return_dict_in_generate=True, output_logits=True) if logprobs is not None else {}
    out = _generate(lm, ids, max_tokens, temperature, top_p, n if sample else 1, **extra)
    seqs, logits = (out.sequences, out.logits) if logprobs is not None else (out, None)
    eos = tok.eos_token_id
    result = []
    rows = seqs[:, len(ids):].tolist()
    for r, seq in enumerate(rows if sample else rows * n):  # greedy: the n completions are one
        ended = eos is not None and eos in seq
        if ended:
            seq = seq[: seq.index(eos)]
        text, stopped = cut_at_stop(tok.decode(seq, skip_special_tokens=True), stops)
        lps = None
        if logits is not None:
            row = r if sample else 0
            lps = _token_logprobs(tok, seq, [step[row] for step in logits], logprobs, len(text))
        result.append(Completion(text, "stop" if (ended or stopped) else "length", len(seq), lps))
    return result


class _ChoiceStreamer(BaseStreamer):
    """Decodes one growing sequence and emits only text that can no longer change: the tail that could
    still become a stop string, or an incomplete character, is held back until the next token."""

    def __init__(self, tokenizer: Any, stops: list[str], emit: Any) -> None:
        self.tok, self.stops, self.emit = tokenizer, stops, emit
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = self.stopped = self.eos = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.stopped or self.eos:
            return
        new = value.reshape(-1).tolist()
        if self.tok.eos_token_id in new:
            new, self.eos = new[: new.index(self.tok.eos_token_id)], True
        self.ids += new
        text, self.stopped = cut_at_stop(self.tok.decode(self.ids, skip_special_tokens=True), self.stops)
        self._send(text if self.stopped else text[: max(0, len(text) - self.hold)].rstrip("\ufffd"))

    def end(self) -> None:
        if not self.stopped:
            text, self.stopped = cut_at_stop(self.tok.decode(self.ids, skip_special_tokens=True), self.stops)
            self._send(text)

    def _send(self, safe: str) -> None:
        if len(safe) > self.sent:
            self.emit(safe[self.sent:])
            self.sent = len(safe)

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped or self.eos else "length"


class _Until(StoppingCriteria):
    def __init__(self, streamer: _ChoiceStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.streamer.stopped, dtype=torch.bool, device=input_ids.device)


def stream_complete(lm: LoadedModel, prompts: list[list[int]], lock: AbstractContextManager, *, max_tokens: int,
                    temperature: float, top_p: float, n: int, stops: list[str],
                    seed: int | None = None) -> Iterator[tuple[int, str, str | None]]:
    """``(choice index, text, finish_reason)`` as the text is generated (``finish_reason`` set on each
    choice's last item). Choice ``i * n + j`` is the ``j``-th completion of prompt ``i``. All choices are
    generated in one thread under ``lock`` (the weights' read side), whatever pace the caller reads at."""
    items: queue.Queue = queue.Queue()

    def produce() -> None:
        try:
            with lock:
                if temperature >= GREEDY_BELOW and seed is not None:
                    torch.manual_seed(seed)
                for i, ids in enumerate(prompts):
                    for j in range(n):
                        k = i * n + j
                        streamer = _ChoiceStreamer(lm.tokenizer, stops, lambda text, k=k: items.put((k, text, None)))
                        _generate(lm, ids, max_tokens, temperature, top_p, 1, streamer=streamer,
                                  stopping_criteria=StoppingCriteriaList([_Until(streamer)]))
                        items.put((k, "", streamer.finish_reason))
        except BaseException as e:  # re-raised in the reading thread
            items.put(e)
        finally:
            items.put(None)

    threading.Thread(target=produce, name="seqedit-stream", daemon=True).start()
    while (item := items.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item
