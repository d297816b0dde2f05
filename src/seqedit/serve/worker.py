"""The single worker thread that owns the :class:`~seqedit.Editor` (its ledger connection belongs to
this thread): it opens the ledger, reconciles and verifies, then applies queued facts in batches (one
ledger step per batch) and runs the API's forget / undo / verify / export jobs between batches.

Batching: a batch starts when ``max_batch`` edits are queued or the oldest has waited ``max_wait_s``.
A batch holds at most one fact per slot and per fact id; later ones wait for the next batch (so two
corrections of one slot both apply, in order). A batch the editor refuses is split in halves until
the refused fact is alone; it alone is rejected with the editor's message. Steps hold the write side
of :class:`~.weights_lock.WeightsLock`; completions hold the read side.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from ..editor import Editor
from ..errors import SeqEditError
from ..facts import Fact
from ..ledger import FactRow, StepRecord
from ..models.load import LoadedModel
from .config import ServeConfig
from .edit_queue import EDIT_META_KEY, EditQueue, EditRecord
from .errors import ApiError
from .weights_lock import WeightsLock

__all__ = ["LedgerView", "Worker"]

log = logging.getLogger("seqedit.serve")


@dataclass(frozen=True)
class LedgerView:
    """What the API reads without asking the worker: the ledger as of the last step."""

    facts: tuple[FactRow, ...] = ()
    steps: tuple[StepRecord, ...] = ()
    last_step: int = 0

    def fact(self, fact_id: str) -> FactRow | None:
        return next((r for r in self.facts if r.fact.id == fact_id), None)


class Worker:
    """``Worker(config, queue, load)``: ``load()`` returns the base model (called on the worker thread)."""

    def __init__(self, config: ServeConfig, queue: EditQueue, load: Callable[[], LoadedModel]) -> None:
        self.config, self.queue, self._load = config, queue, load
        self.weights = WeightsLock()
        self.view = LedgerView()
        self.loaded: LoadedModel | None = None
        self.editor: Editor | None = None
        self.ready = False
        self.status = "starting"
        self.verify_report: dict[str, Any] | None = None
        self._jobs: deque[tuple[Callable[[Editor], Any], Future]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="seqedit-worker", daemon=True)

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """A new edit was queued."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the step in progress, start no other, close the ledger."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def call(self, fn: Callable[[Editor], Any]) -> Any:
        """Run ``fn(editor)`` on the worker thread between batches and return its result."""
        if not self.ready:
            raise ApiError(503, "unavailable", f"the service is not ready ({self.status})")
        fut: Future = Future()
        self._jobs.append((fn, fut))
        self._wake.set()
        return fut.result(self.config.job_timeout_s)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            self._open()
        except Exception as e:  # reported by /readyz; the process stays up to say why
            self.status = f"failed to start: {e}"
            log.error("worker failed to start", exc_info=e, extra={"event": "worker_failed"})
            return
        try:
            while not self._stop.is_set():
                self._run_jobs()
                batch = self._due_batch()
                if batch:
                    self._apply(batch)
                    continue
                age = self.queue.oldest_queued_age()
                wait = 1.0 if age is None else max(0.0, self.config.max_wait_s - age)
                self._wake.wait(wait)
                self._wake.clear()
        finally:
            self.ready = False
            self.status = "stopped"
            while self._jobs:
                self._jobs.popleft()[1].set_exception(ApiError(503, "unavailable", "the service is shutting down"))
            if self.editor is not None:
                self.editor.close()
            log.info("worker stopped", extra={"event": "worker_stopped"})

    def _open(self) -> None:
        t0 = time.perf_counter()
        self.status = "loading the model"
        self.loaded = self._load()
        self.status = "opening the ledger"
        options = {k: v for k, v in self.config.editor_options.items() if v is not None}
        self.editor = Editor(self.loaded, ledger=self.config.ledger, **options)
        found = self._reconcile()
        self._refresh()
        if self.config.verify_on_start and self.view.last_step:
            self.status = "verifying the ledger"
            rep = self.editor.verify()
            self.verify_report = rep.to_dict()
            if not rep.ok:
                self.status = "ledger verification failed at start: run `seqedit verify`"
                log.error("verify failed", extra={"event": "verify_failed", "report": self.verify_report})
                return
        self.ready, self.status = True, "ready"
        log.info("worker ready", extra={"event": "ready", "step": self.view.last_step, "reconciled": found,
                                        "queued": self.queue.counts()["queued"],
                                        "seconds": round(time.perf_counter() - t0, 3)})

    def _reconcile(self) -> int:
        """Edits a crash left queued although their apply step was committed become applied."""
        ledger = self.editor.ledger
        applied: dict[str, int] = {}
        for step in range(self.queue.max_applied_step() + 1, ledger.last_step + 1):
            if ledger.step(step).kind != "apply":
                continue
            for row in ledger.rows_added(step):
                edit = row.fact.meta.get(EDIT_META_KEY)
                if isinstance(edit, str):
                    applied[edit] = step
        return self.queue.reconcile(applied)

    def _refresh(self) -> None:
        """Read the steps since the last refresh (and the targets of new undos, whose ``undone_by``
        changed) and the facts in force; the cost does not grow with the ledger's history."""
        ledger = self.editor.ledger
        steps = {s.id: s for s in self.view.steps}
        new = [ledger.step(i) for i in range(self.view.last_step + 1, ledger.last_step + 1)]
        for s in new:
            if s.target is not None and s.target in steps:
                steps[s.target] = ledger.step(s.target)
        steps.update((s.id, s) for s in new)
        self.view = LedgerView(tuple(ledger.in_force()), tuple(steps[i] for i in sorted(steps)), ledger.last_step)

    def _run_jobs(self) -> None:
        while self._jobs:
            fn, fut = self._jobs.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(self.editor)
            except BaseException as e:  # handed to the waiting request
                self._refresh()
                fut.set_exception(e)
            else:
                self._refresh()  # before the caller sees the result
                fut.set_result(result)

    def _due_batch(self) -> list[EditRecord]:
        if not self.ready:
            return []
        cfg = self.config
        age = self.queue.oldest_queued_age()
        if age is None:
            return []
        candidates = self.queue.queued(cfg.max_batch * 4)
        if len(candidates) < cfg.max_batch and age < cfg.max_wait_s:
            return []
        batch, slots, ids = [], set(), set()
        for rec in candidates:
            try:
                fact = Fact.from_dict(rec.fact)
            except SeqEditError as e:  # validated on submit; a stored record that no longer parses
                self.queue.mark_rejected(rec.id, str(e))
                continue
            if fact.slot in slots or fact.id in ids:
                continue  # the next batch: one step cannot hold two facts of one slot or id
            slots.add(fact.slot)
            ids.add(fact.id)
            batch.append(rec)
            if len(batch) == cfg.max_batch:
                break
        return batch

    def _apply(self, batch: list[EditRecord]) -> None:
        facts = [Fact.from_dict(r.fact) for r in batch]
        t0 = time.perf_counter()
        try:
            with self.weights.write():
                self.editor.apply(facts)
        except OSError as e:  # the disk, not the facts: keep them queued and retry later
            log.error("step failed; edits stay queued", exc_info=e, extra={"event": "step_io_error"})
            self._stop.wait(1.0)
            return
        except Exception as e:
            if len(batch) > 1:
                mid = len(batch) // 2
                self._apply(batch[:mid])
                self._apply(batch[mid:])
                return
            known = isinstance(e, (SeqEditError, ValueError, TypeError))
            reason = str(e) if known else f"internal error while applying the fact ({type(e).__name__})"
            if not known:
                log.error("step failed", exc_info=e, extra={"event": "step_error"})
            self.queue.mark_rejected(batch[0].id, reason)
            log.info("edit rejected", extra={"event": "rejected", "edit": batch[0].id, "reason": reason})
            return
        step = self.editor.last_record.id
        self._refresh()  # before the edits read as applied, so a client that saw "applied" finds the fact
        self.queue.mark_applied([r.id for r in batch], step)
        log.info("step applied", extra={"event": "applied", "step": step, "facts": len(batch),
                                        "seconds": round(time.perf_counter() - t0, 3)})
