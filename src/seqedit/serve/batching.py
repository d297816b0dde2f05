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

__all__ = ["Batcher", "complete_batch"]

log = logging.getLogger("seqedit.serve")


class _Row:
    """One prompt's generated tokens, and whether it is done (``max_tokens``, end of sequence, or a
    stop string in its text)."""

    def __init__(self, tok, max_tokens: int, stops: list[str]) -> None:
        self.tok, self.max_tokens, self.stops = tok, max_tokens, [s for s in stops if s]
        self.ids: list[int] = []
        self.ended = self.stopped = False

    def take(self, token: int) -> bool:
        """Record the next greedy token; whether the row is now done."""
        eos = self.tok.eos_token_id
        if eos is not None and token == eos:
            self.ended = True
            return True
        self.ids.append(token)
        if self.stops:
            self.stopped = cut_at_stop(self.tok.decode(self.ids, skip_special_tokens=True), self.stops)[1]
        return self.stopped or len(self.ids) >= self.max_tokens

    def completion(self) -> Completion:
        text, stopped = cut_at_stop(self.tok.decode(self.ids, skip_special_tokens=True), self.stops)
        return Completion(text, "stop" if (self.ended or stopped) else "length", len(self.ids))


def complete_batch(lm: LoadedModel, prompts: list[list[int]], max_tokens: list[int],
                   stops: list[list[str]]) -> list[Completion]:
    """One greedy completion per prompt, decoded together: ``prompts[i]`` (token ids) gets at most
    ``max_tokens[i]`` new tokens (each ≥ 1), cut at end of sequence and at its own ``stops[i]``. A row
    stops at its stop string, so ``tokens`` counts what was generated up to it."""
    rows = [_Row(lm.tokenizer, m, s) for m, s in zip(max_tokens, stops)]
    live, state = list(range(len(rows))), prefill(lm, prompts)
    while True:
        done = [rows[i].take(t) for i, t in zip(live, state.next_ids.tolist())]
        keep = [k for k, d in enumerate(done) if not d]
        if not keep:
            return [r.completion() for r in rows]
        if len(keep) < len(live):
            state, live = state.select(keep), [live[k] for k in keep]
        state = step(lm, state)


@dataclass
class _Unit:
    """The prompts of one request (answered together, when its last row is done)."""

    prompts: list[list[int]]
    max_tokens: int
    stops: list[str]
    future: Future = field(default_factory=Future)
    rows: list[_Row] = field(default_factory=list)
    left: int = 0


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
        self.batches = 0  # groups prefilled (requests that joined together)
        self.rows = 0  # prompts decoded
        self.steps = 0  # decode steps
        self.shared_steps = 0  # decode steps of more than one request
        self.live_rows = 0  # prompts decoding now
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
                    self._decode()
            except BaseException as e:  # every request still running hears of it
                log.error("batched decode failed", exc_info=e, extra={"event": "batch_error"})
                for u in self._running:
                    if not u.future.done():
                        u.future.set_exception(e)
            self._running, self.live_rows = [], 0
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

    def _decode(self) -> None:
        """Decode the running units and every unit that joins them, until no row is left (under the
        read lock); each unit is answered when its last row is done."""
        live: list[tuple[_Unit, _Row]] = []
        state: DecodeRows | None = None
        joining = list(self._running)
        while True:
            if joining:
                state, live = self._join(state, live, joining)
            assert state is not None
            done = [row.take(t) for (_, row), t in zip(live, state.next_ids.tolist())]
            for (unit, _), finished in zip(live, done):
                if finished:
                    unit.left -= 1
                    if not unit.left:
                        unit.future.set_result([r.completion() for r in unit.rows])
            keep = [k for k, finished in enumerate(done) if not finished]
            self.live_rows = len(keep)
            if not keep:
                return
            if len(keep) < len(live):
                state, live = state.select(keep), [live[k] for k in keep]
            joining = [] if self.writer_waiting() or not state.joinable else self._gather(len(live), False)
            self._running += joining
            self.live_rows += sum(len(u.prompts) for u in joining)
            state = step(self.lm, state)
            self.steps += 1
            self.shared_steps += len({id(u) for u, _ in live}) > 1

    def _join(self, state: DecodeRows | None, live: list[tuple[_Unit, _Row]], units: list[_Unit]
              ) -> tuple[DecodeRows, list[tuple[_Unit, _Row]]]:
        """``units``' prompts prefilled as one group and merged after the running rows."""
        tok = self.lm.tokenizer
        for u in units:
            u.rows, u.left = [_Row(tok, u.max_tokens, u.stops) for _ in u.prompts], len(u.prompts)
        group = prefill(self.lm, [p for u in units for p in u.prompts])
        self.batches += 1
        self.rows += group.size
        joined = [(u, r) for u in units for r in u.rows]
        return (group if state is None else state.merge(group)), live + joined

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
