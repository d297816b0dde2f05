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

__all__ = ["Completion", "GREEDY_BELOW", "complete", "cut_at_stop", "prompt_ids", "stream_complete"]

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


def complete(lm: LoadedModel, ids: list[int], *, max_tokens: int, temperature: float, top_p: float, n: int,
             stops: list[str], seed: int | None = None) -> list[Completion]:
    """``n`` completions of the prompt ``ids`` with at most ``max_tokens`` new tokens each."""
    tok = lm.tokenizer
    sample = temperature >= GREEDY_BELOW
    if sample and seed is not None:
        torch.manual_seed(seed)
    out = _generate(lm, ids, max_tokens, temperature, top_p, n if sample else 1)
    eos = tok.eos_token_id
    result = []
    rows = out[:, len(ids):].tolist()
    for seq in rows if sample else rows * n:  # greedy: the n completions are one
        ended = eos is not None and eos in seq
        if ended:
            seq = seq[: seq.index(eos)]
        text, stopped = cut_at_stop(tok.decode(seq, skip_special_tokens=True), stops)
        result.append(Completion(text, "stop" if (ended or stopped) else "length", len(seq)))
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
