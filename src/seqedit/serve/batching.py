"""Dynamic batching of greedy completions: concurrent requests share forward passes.

Requests that arrive while a batch is forming (up to ``wait_s`` after the first, at most
``max_rows`` prompts) are left-padded into one ``generate`` call, which keeps one KV cache for the
batch; each row is then cut to its own ``max_tokens``, end of sequence and stop strings. Greedy
decoding of a row does not depend on the other rows (padding is masked, positions follow the mask),
so a batched answer is the answer the request would get alone (``tests/unit/test_serve_batching.py``).

All prompts of one request go into the same batch, and a batch holds the weights' read lock from its
first token to its last: one answer never mixes weights from before and after a step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.load import LoadedModel
from .errors import ApiError
from .generate import Completion, cut_at_stop

__all__ = ["Batcher", "complete_batch"]

log = logging.getLogger("seqedit.serve")


@torch.no_grad()
def complete_batch(lm: LoadedModel, prompts: list[list[int]], max_tokens: list[int],
                   stops: list[list[str]]) -> list[Completion]:
    """One greedy completion per prompt, generated together: ``prompts[i]`` (token ids) gets at most
    ``max_tokens[i]`` new tokens, cut at EOS and at its own ``stops[i]``."""
    tok = lm.tokenizer
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token is at the same column
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = lm.model.generate(input_ids=ids.to(lm.input_device), attention_mask=mask.to(lm.input_device),
                            max_new_tokens=max(max_tokens), do_sample=False, pad_token_id=pad,
                            eos_token_id=tok.eos_token_id, top_k=None)
    result = []
    for i, seq in enumerate(out[:, width:].tolist()):
        seq = seq[: max_tokens[i]]
        eos = tok.eos_token_id
        ended = eos is not None and eos in seq
        if ended:
            seq = seq[: seq.index(eos)]
        text, stopped = cut_at_stop(tok.decode(seq, skip_special_tokens=True), stops[i])
        result.append(Completion(text, "stop" if (ended or stopped) else "length", len(seq)))
    return result


@dataclass
class _Unit:
    """The prompts of one request (answered together)."""

    prompts: list[list[int]]
    max_tokens: int
    stops: list[str]
    future: Future = field(default_factory=Future)


class Batcher:
    """``Batcher(lm, read_lock, max_rows, wait_s)``; :meth:`complete` blocks its caller until its batch ran."""

    def __init__(self, lm: LoadedModel, read_lock: Callable[[], AbstractContextManager], max_rows: int = 16,
                 wait_s: float = 0.01) -> None:
        self.lm, self.read_lock, self.max_rows, self.wait_s = lm, read_lock, max_rows, wait_s
        self._queue: queue.Queue[_Unit | None] = queue.Queue()
        self.batches = 0
        self.rows = 0
        self._last_units = 0
        self._thread = threading.Thread(target=self._run, name="seqedit-batcher", daemon=True)
        self._thread.start()

    def complete(self, prompts: list[list[int]], max_tokens: int, stops: list[str]) -> list[Completion]:
        """Greedy completions of ``prompts`` (one per prompt), batched with whatever else is waiting."""
        unit = _Unit(prompts, max_tokens, stops)
        self._queue.put(unit)
        return unit.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)

    def _run(self) -> None:
        carry: _Unit | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                self._refuse_waiting()
                return
            batch, rows = [first], len(first.prompts)
            # wait for company only where there is concurrency: a lone client pays no batching delay
            deadline = time.monotonic() + (self.wait_s if self._last_units > 1 or not self._queue.empty() else 0.0)
            while rows < self.max_rows:
                try:
                    unit = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if unit is None:
                    self._queue.put(None)  # stop after this batch
                    break
                if rows + len(unit.prompts) > self.max_rows:
                    carry = unit  # it starts the next batch
                    break
                batch.append(unit)
                rows += len(unit.prompts)
            self._last_units = len(batch)
            self._generate(batch)

    def _refuse_waiting(self) -> None:
        """After close: answer whatever is still queued (a request must not wait forever)."""
        while True:
            try:
                unit = self._queue.get_nowait()
            except queue.Empty:
                return
            if unit is not None:
                unit.future.set_exception(ApiError(503, "unavailable", "the service is shutting down"))

    def _generate(self, batch: list[_Unit]) -> None:
        prompts = [p for u in batch for p in u.prompts]
        limits = [u.max_tokens for u in batch for _ in u.prompts]
        stops = [u.stops for u in batch for _ in u.prompts]
        try:
            with self.read_lock():
                out = complete_batch(self.lm, prompts, limits, stops)
        except BaseException as e:  # every request of the batch hears of it
            for u in batch:
                u.future.set_exception(e)
            return
        self.batches += 1
        self.rows += len(prompts)
        at = 0
        for u in batch:
            u.future.set_result(out[at: at + len(u.prompts)])
            at += len(u.prompts)
