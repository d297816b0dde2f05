"""Continuous batching of greedy completions: concurrent requests share decode steps.

One thread decodes every active row together (:mod:`seqedit.serve.decode_rows`: one left-padded KV
cache). Between two decode steps, requests that arrived join the running rows (their prompts
prefilled as one group, then merged in) and rows that are done leave, so a request never waits for
another's last token to start. A lone request waits for nothing; a first request that finds others
queued waits ``wait_s`` for company. Greedy decoding of a row does not depend on the other rows
(padding is masked, positions count each row's own tokens), so a batched answer is the answer the
request gets alone (``tests/unit/test_serve_batching.py``).

All prompts of one request join together, and the rows hold the weights' read lock from the first
row's first token until no row is left: one answer never mixes weights from before and after a step.
While a writer (a ledger step) waits for the lock, no new request joins; the running rows finish,
the lock is released, the step runs, and the waiting requests start after it.
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

from ..models.load import LoadedModel
from .decode_rows import DecodeRows, prefill, step
from .errors import ApiError
from .generate import Completion, cut_at_stop

__all__ = ["Batcher", "DecodeCounts", "complete_batch"]

log = logging.getLogger("seqedit.serve")


class _Row:
    """One prompt's generated tokens, and whether it is done (``max_tokens``, end of sequence, or a
    stop string in its text)."""

    def __init__(self, tok, max_tokens: int, stops: list[str]) -> None:
        self.tok, self.max_tokens, self.stops = tok, max_tokens, [s for s in stops if s]
        self.ids: list[int] = []
        self.ended = self.stopped = self.done = False

    def take(self, token: int) -> bool:
        """Record the next greedy token; whether the row is now done."""
        eos = self.tok.eos_token_id
        if eos is not None and token == eos:
            self.ended = True
        else:
            self.ids.append(token)
            if self.stops:
                self.stopped = cut_at_stop(self.tok.decode(self.ids, skip_special_tokens=True), self.stops)[1]
        self.done = self.ended or self.stopped or len(self.ids) >= self.max_tokens
        return self.done

    def completion(self) -> Completion:
        text, stopped = cut_at_stop(self.tok.decode(self.ids, skip_special_tokens=True), self.stops)
        return Completion(text, "stop" if (self.ended or stopped) else "length", len(self.ids))


def complete_batch(lm: LoadedModel, prompts: list[list[int]], max_tokens: list[int],
                   stops: list[list[str]]) -> list[Completion]:
    """One greedy completion per prompt, decoded together by the batcher's own loop: ``prompts[i]``
    (token ids) gets at most ``max_tokens[i]`` new tokens (each ≥ 1), cut at end of sequence and at its
    own ``stops[i]``. A row stops at its stop string, so ``tokens`` counts what was generated up to it."""
    units = [_Unit([p], m, s) for p, m, s in zip(prompts, max_tokens, stops)]
    _decode(lm, units, lambda _live: [], DecodeCounts())
    return [u.future.result()[0] for u in units]


@dataclass
class DecodeCounts:
    """What a decode loop did; the service's ``/metrics`` read them."""

    batches: int = 0  # groups prefilled (requests that joined together)
    rows: int = 0  # prompts decoded
    steps: int = 0  # decode steps
    shared_steps: int = 0  # decode steps of more than one request
    live_rows: int = 0  # prompts decoding now


@dataclass
class _Unit:
    """The prompts of one request (answered together, when its last row is done)."""

    prompts: list[list[int]]
    max_tokens: int
    stops: list[str]
    future: Future = field(default_factory=Future)
    rows: list[_Row] = field(default_factory=list)


class Batcher:
    """``Batcher(lm, read_lock, max_rows, wait_s, writer_waiting)``; :meth:`complete` blocks its caller
    until its rows are done. ``writer_waiting()`` says a ledger step waits for the weights: no request
    joins until the running rows finish and the lock has been released."""

    def __init__(self, lm: LoadedModel, read_lock: Callable[[], AbstractContextManager], max_rows: int = 16,
                 wait_s: float = 0.01, writer_waiting: Callable[[], bool] = lambda: False) -> None:
        self.lm, self.read_lock, self.max_rows, self.wait_s = lm, read_lock, max_rows, wait_s
        self.writer_waiting = writer_waiting
        self._queue: queue.Queue[_Unit | None] = queue.Queue()
        self._carry: _Unit | None = None  # taken from the queue, did not fit: it joins first
        self._closing = False
        self._running: list[_Unit] = []  # the units whose rows are decoding (or about to)
        self.counts = DecodeCounts()
        self._thread = threading.Thread(target=self._run, name="seqedit-batcher", daemon=True)
        self._thread.start()

    def complete(self, prompts: list[list[int]], max_tokens: int, stops: list[str]) -> list[Completion]:
        """Greedy completions of ``prompts`` (one per prompt, ``max_tokens`` ≥ 1), decoded with
        whatever else is running."""
        unit = _Unit(prompts, max_tokens, stops)
        self._queue.put(unit)
        return unit.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)

    # ------------------------------------------------------------------ the decode thread
    def _run(self) -> None:
        while True:
            first = self._next(block=True)
            if first is None:
                self._refuse_waiting()
                return
            self._running = [first, *self._gather(len(first.prompts), first_wait=not self._queue.empty())]
            try:
                with self.read_lock():
                    _decode(self.lm, self._running, self._joiners, self.counts)
            except BaseException as e:  # every request still running hears of it
                log.error("batched decode failed", exc_info=e, extra={"event": "batch_error"})
                for u in self._running:
                    if not u.future.done():
                        u.future.set_exception(e)
            self._running, self.counts.live_rows = [], 0
            if self._closing:
                self._refuse_waiting()
                return

    def _next(self, block: bool, timeout: float | None = None) -> _Unit | None:
        """The carried unit, else the next queued one (``None``: closed, or nothing within ``timeout``)."""
        if self._carry is not None:
            unit, self._carry = self._carry, None
            return unit
        if self._closing:
            return None
        try:
            unit = self._queue.get(block=block, timeout=timeout)
        except queue.Empty:
            return None
        if unit is None:
            self._closing = True
        return unit

    def _gather(self, rows: int, first_wait: bool) -> list[_Unit]:
        """Queued units that fit beside ``rows`` running rows (whole units, in arrival order); waits up
        to ``wait_s`` for company when ``first_wait``, else takes only what is already there."""
        out: list[_Unit] = []
        deadline = time.monotonic() + (self.wait_s if first_wait else 0.0)
        while rows < self.max_rows:
            left = deadline - time.monotonic()
            unit = self._next(block=left > 0, timeout=max(0.0, left))
            if unit is None:
                break
            if rows + len(unit.prompts) > self.max_rows:
                self._carry = unit
                break
            out.append(unit)
            rows += len(unit.prompts)
        return out

    def _joiners(self, live: int) -> list[_Unit]:
        """The queued units that join ``live`` running rows now: none while a writer waits."""
        return [] if self.writer_waiting() else self._gather(live, False)

    def _refuse_waiting(self) -> None:
        """After close: answer whatever is still queued (a request must not wait forever)."""
        pending = [self._carry] if self._carry is not None else []
        self._carry = None
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for unit in pending:
            if unit is not None:
                unit.future.set_exception(ApiError(503, "unavailable", "the service is shutting down"))


def _decode(lm: LoadedModel, running: list[_Unit], joiners: Callable[[int], list[_Unit]], counts: DecodeCounts) -> None:
    """Decode ``running`` and, between two steps, the units ``joiners(live rows)`` gives (appended to
    ``running``, so a caller that sees an error knows whom to tell), until no row is left; each unit is
    answered when its last row is done. Joiners are asked only while the cache can take them."""
    live: list[tuple[_Unit, _Row]] = []
    state: DecodeRows | None = None
    joining = list(running)
    while True:
        if joining:
            state, live = _join(lm, state, live, joining, counts)
        assert state is not None
        counts.live_rows = len(live)
        done = [row.take(t) for (_, row), t in zip(live, state.next_ids.tolist())]
        for unit in {id(u): u for (u, _), finished in zip(live, done) if finished}.values():
            if all(r.done for r in unit.rows):  # its last row(s) finished at this step
                unit.future.set_result([r.completion() for r in unit.rows])
        keep = [k for k, finished in enumerate(done) if not finished]
        if not keep:
            counts.live_rows = 0
            return
        if len(keep) < len(live):
            state, live = state.select(keep), [live[k] for k in keep]
        joining = joiners(len(live)) if state.joinable else []
        running += joining
        state = step(lm, state)
        counts.steps += 1
        counts.shared_steps += len({id(u) for u, _ in live}) > 1


def _join(lm: LoadedModel, state: DecodeRows | None, live: list[tuple[_Unit, _Row]], units: list[_Unit],
          counts: DecodeCounts) -> tuple[DecodeRows, list[tuple[_Unit, _Row]]]:
    """``units``' prompts prefilled as one group and merged after the running rows."""
    for u in units:
        u.rows = [_Row(lm.tokenizer, u.max_tokens, u.stops) for _ in u.prompts]
    group = prefill(lm, [p for u in units for p in u.prompts])
    counts.batches += 1
    counts.rows += group.size
    return (group if state is None else state.merge(group)), live + [(u, r) for u in units for r in u.rows]
