"""The single worker thread that owns the :class:`~seqedit.Editor` (its ledger connection belongs to
this thread): it opens the ledger, reconciles and verifies, then applies queued facts in batches (one
ledger step per batch) and runs the API's forget / undo / verify / export jobs between batches.

Batching: a batch starts when ``max_batch`` edits are queued or the oldest has waited ``max_wait_s``.
A batch holds at most one fact per slot and per fact id; later ones wait for the next batch (so two
corrections of one slot both apply, in order). A batch the editor refuses is split in halves until
the refused fact is alone; it alone is rejected with the editor's message. Only a refusal of the
facts (a ``SeqEditError`` or ``ValueError``) is bisected: any other failure (out of memory, a full
disk, an internal error) keeps the whole batch queued and retries it after a backoff that doubles up
to :data:`MAX_BACKOFF_S`. Steps hold the write side of :class:`~.weights_lock.WeightsLock`;
completions hold the read side. Jobs (:mod:`.jobs`) run between batches.
"""

from __future__ import annotations

import logging
import threading
import time
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
from .batching import Batcher
from .jobs import Jobs
from .weights_lock import WeightsLock

__all__ = ["LedgerView", "MAX_BACKOFF_S", "Worker", "fact_level"]

log = logging.getLogger("seqedit.serve")
MAX_BACKOFF_S = 60.0
PRUNE_EVERY_S = 3600.0


def fact_level(e: BaseException) -> bool:
    """Whether the editor refused the facts themselves (bisect and reject), rather than failing."""
    return isinstance(e, (SeqEditError, ValueError)) and not isinstance(e, (OSError, MemoryError))


def _job_error(e: BaseException, what: str) -> ApiError:
    if fact_level(e):
        return ApiError(409, "conflict", f"{what}: {e}")
    log.error("job failed", exc_info=e, extra={"event": "job_error", "what": what})
    return ApiError(500, "internal", f"{what}: internal error ({type(e).__name__}; see the server log)")


@dataclass(frozen=True)
class LedgerView:
    """What the API reads without asking the worker: the ledger as of the last step."""

    facts: tuple[FactRow, ...] = ()
    steps: tuple[StepRecord, ...] = ()
    last_step: int = 0

    def __post_init__(self) -> None:
        # built once per step, so a lookup or a search does not parse 100,000 facts per request
        object.__setattr__(self, "_by_id", {r.fact.id: r for r in self.facts})
        object.__setattr__(self, "_haystack", None)

    def fact(self, fact_id: str) -> FactRow | None:
        return self._by_id.get(fact_id)

    def search(self, query: str) -> list[FactRow]:
        """Facts in force whose id, subject, target or filled prompt contain ``query`` (case-folded), oldest first."""
        if self._haystack is None:
            object.__setattr__(self, "_haystack", [
                "\n".join((r.fact.id or "", r.fact.subject, r.fact.target, r.fact.prompt.replace("{}", r.fact.subject)))
                .casefold() for r in self.facts])
        q = query.casefold()
        return [r for r, text in zip(self.facts, self._haystack) if q in text]


class Worker:
    """``Worker(config, queue, load)``: ``load()`` returns the base model (called on the worker thread)."""

    def __init__(self, config: ServeConfig, queue: EditQueue, load: Callable[[], LoadedModel]) -> None:
        self.config, self.queue, self._load = config, queue, load
        self.weights = WeightsLock()
        self.view = LedgerView()
        self.loaded: LoadedModel | None = None
        self.batcher: Batcher | None = None  # greedy completions share forward passes
        self.editor: Editor | None = None
        self.ready = False
        self.status = "starting"
        self.verify_report: dict[str, Any] | None = None
        self.jobs = Jobs(config.max_jobs, _job_error)
        self.backoff_s = 0.0  # after a failed step that was not the facts' fault
        self._retry_at = 0.0
        self._pruned_at = 0.0
        self.step_seconds = 1.0  # of the last step (Retry-After estimates)
        self.steps_applied = 0
        self.steps_failed = 0
        self.on_step: Callable[[float, int], None] | None = None  # (seconds, facts) of each applied step
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

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying a refused request: the queue's drain time, about."""
        queued = self.queue.counts()["queued"]
        steps = max(1, -(-queued // self.config.max_batch))
        return max(1, min(600, int(steps * self.step_seconds + self.config.max_wait_s + 0.999)))

    def call(self, fn: Callable[[Editor], Any], what: str = "job", render: Callable[[Any], Any] = lambda r: r) -> Any:
        """Run ``fn(editor)`` on the worker thread between batches and return ``render`` of its result
        (a 202 :class:`~.jobs.JobRunning` or a 503 when ``job_timeout_s`` runs out, see :mod:`.jobs`)."""
        if not self.ready:
            raise ApiError(503, "unavailable", f"the service is not ready ({self.status})")
        job = self.jobs.submit(fn, what, render, self.retry_after())
        self._wake.set()
        return self.jobs.wait(job, self.config.job_timeout_s)

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
                self.jobs.run_waiting(self.editor, self._refresh)
                self._prune()
                batch = self._due_batch()
                if batch:
                    self._apply(batch)
                    continue
                age = self.queue.oldest_queued_age()
                wait = 1.0 if age is None else max(0.0, self.config.max_wait_s - age)
                if age is not None and self._retry_at > time.monotonic():
                    wait = min(1.0, self._retry_at - time.monotonic())
                self._wake.wait(wait)
                self._wake.clear()
        finally:
            self.ready = False
            self.status = "stopped"
            self.jobs.fail_waiting("the service is shutting down")
            if self.batcher is not None:
                self.batcher.close()
            if self.editor is not None:
                self.editor.close()
            log.info("worker stopped", extra={"event": "worker_stopped"})

    def _open(self) -> None:
        t0 = time.perf_counter()
        self.status = "loading the model"
        self.loaded = self._load()
        if self.config.batch_rows > 1:
            self.batcher = Batcher(self.loaded, self.weights.read, self.config.batch_rows, self.config.batch_wait_s,
                                   writer_waiting=self.weights.writer_waiting)
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
        ledger = self.editor.committed_ledger
        if ledger is None:  # a new ledger: created by the first edit's commit, nothing to reconcile
            return 0
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
        ledger = self.editor.committed_ledger
        if ledger is None:  # not created yet: no step, no fact
            self.view = LedgerView()
            return
        steps = {s.id: s for s in self.view.steps}
        new = [ledger.step(i) for i in range(self.view.last_step + 1, ledger.last_step + 1)]
        for s in new:
            if s.target is not None and s.target in steps:
                steps[s.target] = ledger.step(s.target)
        steps.update((s.id, s) for s in new)
        self.view = LedgerView(tuple(ledger.in_force()), tuple(steps[i] for i in sorted(steps)), ledger.last_step)

    def _prune(self) -> None:
        """Drop applied queue entries older than ``keep_applied_days`` (at most once an hour)."""
        days = self.config.keep_applied_days
        if days is None or time.monotonic() - self._pruned_at < PRUNE_EVERY_S and self._pruned_at:
            return
        self._pruned_at = time.monotonic()
        n = self.queue.prune_applied(time.time() - days * 86400.0)
        if n:
            log.info("applied edits pruned", extra={"event": "pruned", "edits": n, "days": days})

    def _due_batch(self) -> list[EditRecord]:
        if not self.ready or time.monotonic() < self._retry_at:
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
        except Exception as e:
            if not fact_level(e):  # memory, disk, a bug: not the facts' fault, so none is rejected
                self.steps_failed += 1
                self.backoff_s = min(MAX_BACKOFF_S, max(1.0, 2 * self.backoff_s))
                self._retry_at = time.monotonic() + self.backoff_s
                log.error("step failed; its edits stay queued", exc_info=e,
                          extra={"event": "step_failed", "facts": len(batch), "retry_in_s": self.backoff_s})
                return
            if len(batch) > 1:
                mid = len(batch) // 2
                self._apply(batch[:mid])
                self._apply(batch[mid:])
                return
            self.queue.mark_rejected(batch[0].id, str(e))
            log.info("edit rejected", extra={"event": "rejected", "edit": batch[0].id, "reason": str(e)})
            return
        self.backoff_s = 0.0
        self.steps_applied += 1
        self.step_seconds = time.perf_counter() - t0
        if self.on_step is not None:
            self.on_step(self.step_seconds, len(batch))
        step = self.editor.last_record.id
        self._refresh()  # before the edits read as applied, so a client that saw "applied" finds the fact
        self.queue.mark_applied([r.id for r in batch], step)
        log.info("step applied", extra={"event": "applied", "step": step, "facts": len(batch),
                                        "seconds": round(time.perf_counter() - t0, 3)})
