"""Jobs the API hands to the worker thread (forget, undo, verify, export) that keep their word when the
client's wait runs out: a job not yet started is cancelled (nothing is done, the answer says so);
a job already running finishes, and the client gets ``202`` with the job's id to poll at
``GET /v1/jobs/{id}``, never a 500 and never a success nobody hears of.

The deque of waiting jobs is bounded (``max_jobs``): a full one answers 429 with ``Retry-After``.
Finished jobs are kept (their result or error as JSON) for the last :data:`KEPT` jobs.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ApiError, error_body

__all__ = ["Job", "JobRunning", "Jobs", "KEPT"]

KEPT = 1000
# concurrent.futures.TimeoutError is builtins.TimeoutError from Python 3.11 on, a class of its own on 3.10
_TIMEOUTS = (TimeoutError, concurrent.futures.TimeoutError)


class JobRunning(Exception):
    """The client's wait ran out while the job runs: answer 202 with the job to poll."""

    def __init__(self, job: "Job") -> None:
        super().__init__(job.id)
        self.job = job


@dataclass
class Job:
    id: str
    what: str
    fn: Callable[[Any], Any]
    render: Callable[[Any], Any]  # result -> JSON
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: Any = None
    error: dict | None = None  # {"status", "error": {code, message, type}}

    @property
    def state(self) -> str:
        if self.future.cancelled():
            return "cancelled"
        if self.finished is not None:
            return "failed" if self.error is not None else "done"
        return "running" if self.started is not None else "queued"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "what": self.what, "state": self.state, "created": self.created,
                "started": self.started, "finished": self.finished, "result": self.result,
                "error": None if self.error is None else self.error["error"],
                "status": None if self.error is None else self.error["status"]}


class Jobs:
    """The worker's job deque and the table of recent jobs (thread-safe)."""

    def __init__(self, max_jobs: int, describe_error: Callable[[BaseException, str], ApiError]) -> None:
        self.max_jobs = max_jobs
        self._describe = describe_error
        self._lock = threading.Lock()
        self._waiting: deque[Job] = deque()
        self._table: OrderedDict[str, Job] = OrderedDict()

    def __len__(self) -> int:
        return len(self._waiting)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._table.get(job_id)

    def submit(self, fn: Callable[[Any], Any], what: str, render: Callable[[Any], Any], retry_after: int) -> Job:
        job = Job("j" + uuid.uuid4().hex[:23], what, fn, render)
        with self._lock:
            if len(self._waiting) >= self.max_jobs:
                raise ApiError(429, "too_many_requests", f"{what}: {len(self._waiting)} jobs are waiting already "
                               f"(the limit is {self.max_jobs}); retry later", {"Retry-After": str(retry_after)})
            self._waiting.append(job)
            self._table[job.id] = job
            while len(self._table) > KEPT:
                self._table.popitem(last=False)
        return job

    def wait(self, job: Job, timeout: float) -> Any:
        """The job's result; raises its error, :class:`ApiError` 503 if it was cancelled before it
        started, or :class:`JobRunning` if it is still running when ``timeout`` runs out."""
        try:
            return job.future.result(timeout)
        except _TIMEOUTS:
            if job.future.cancel():  # not started: it never will be
                raise ApiError(503, "timeout", f"{job.what}: the worker did not start it within {timeout:g} s; "
                               "it was cancelled and nothing was done", {"Retry-After": "5"}) from None
            raise JobRunning(job) from None
        except concurrent.futures.CancelledError:
            raise ApiError(503, "unavailable", f"{job.what}: cancelled (the service is shutting down)") from None

    # ------------------------------------------------------------------ the worker thread
    def run_waiting(self, editor: Any, after: Callable[[], None]) -> None:
        """Run every waiting job in order (``after()`` follows each, before its caller sees the outcome)."""
        while True:
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled by a client that stopped waiting
            job.started = time.time()
            try:
                value = job.fn(editor)
                rendered = job.render(value)
            except BaseException as e:  # handed to the waiting request, and kept for a poll
                after()
                err = e if isinstance(e, ApiError) else self._describe(e, job.what)
                job.error = {"status": err.status, **error_body(err.code, err.message)}
                job.finished = time.time()
                job.future.set_exception(err)
            else:
                after()
                job.result, job.finished = rendered, time.time()
                job.future.set_result(rendered)

    def fail_waiting(self, reason: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.future.cancel()
