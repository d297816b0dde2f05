"""The ledger side of the ``/v1`` API: edits (durable queue), facts in force, forget, undo, log, verify,
export. Every route needs a token of the scope it names; :mod:`.completions` has the OpenAI side."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse

from ..errors import FactError
from ..facts import Fact
from ..ledger import FactRow, StepRecord
from .auth import require
from .edit_queue import EDIT_META_KEY, EditQueue, EditRecord, IdempotencyConflict, QueueFull
from .errors import ApiError
from .jobs import JobRunning
from .schemas import (
    EditOut, EditsAccepted, EditsIn, EditsPage, ErrorOut, ExportIn, ExportOut, FactIn, FactOut, FactsPage, JobOut, LogOut,
    StepOut, VerifyIn, VerifyOut,
)
from .worker import Worker

__all__ = ["ERRORS", "READ", "WRITE", "router", "worker_of"]

READ, WRITE = Depends(require("read")), Depends(require("write"))
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorOut} for s in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}
JOB_RUNNING = {202: {"model": JobOut, "description": "The wait ran out while the job runs: poll GET /v1/jobs/{id}"}}
router = APIRouter(prefix="/v1", responses=ERRORS)


def worker_of(request: Request) -> Worker:
    return request.app.state.worker


def _queue(request: Request) -> EditQueue:
    return request.app.state.queue


def _edit_out(r: EditRecord) -> EditOut:
    return EditOut(id=r.id, state=r.state, fact_id=r.fact_id, step=r.step, reason=r.reason,
                   created=r.created, updated=r.updated)


def _fact_out(r: FactRow) -> FactOut:
    return FactOut(**r.fact.to_dict(), step=r.added)


def _step_json(s: StepRecord) -> dict[str, Any]:
    return _step_out(s).model_dump()


def _step_out(s: StepRecord) -> StepOut:
    return StepOut(id=s.id, kind=s.kind, created=s.created, target=s.target, undone_by=s.undone_by,
                   added=list(s.added), removed=list(s.removed))


def _on_worker(worker: Worker, fn: Callable, what: str, render: Callable[[Any], Any]) -> Any:
    """``render(fn(editor))`` run on the worker; refusals of the ledger become 409 with its message. A
    job still running when the wait runs out answers 202 with the job to poll (:mod:`.jobs`)."""
    try:
        return worker.call(fn, what, render)
    except JobRunning as e:
        return JSONResponse(e.job.to_dict(), 202, headers={"Location": f"/v1/jobs/{e.job.id}"})


@router.get("/jobs/{job_id}", response_model=JobOut, dependencies=[READ])
def get_job(job_id: str, request: Request) -> JobOut:
    """A job (forget, undo, verify, export) whose client stopped waiting: its state, then its result or error."""
    job = worker_of(request).jobs.get(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r} (only the last jobs are kept)")
    return JobOut(**job.to_dict())


# ---------------------------------------------------------------------------------------------- edits
META_DEPTH = 8


def _too_deep(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests deeper than ``limit`` (iterative: deep input must not recurse)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return False


def _checked_facts(body: EditsIn, limit: int) -> list[dict[str, Any]]:
    items: list[FactIn] = [body] if isinstance(body, FactIn) else body.facts
    if len(items) > limit:
        raise ApiError(422, "invalid_request", f"facts: at most {limit} facts per request, got {len(items)}")
    out, slots, ids = [], {}, {}
    for i, item in enumerate(items):
        where = "fact" if isinstance(body, FactIn) else f"facts[{i}]"
        data = item.model_dump()
        if _too_deep(data["meta"], META_DEPTH):  # every later reader (journal, JSON, pydantic) recurses
            raise ApiError(422, "invalid_request", f"{where}.meta: nested deeper than {META_DEPTH} levels")
        if EDIT_META_KEY in data["meta"]:
            raise ApiError(422, "invalid_request", f"{where}.meta: the key {EDIT_META_KEY!r} is reserved")
        try:
            fact = Fact.from_dict(data)
        except FactError as e:
            raise ApiError(422, "invalid_request", f"{where}: {e}") from None
        if fact.slot in slots:
            raise ApiError(422, "invalid_request",
                           f"{where}: same subject and relation as facts[{slots[fact.slot]}] in this request")
        if fact.id is not None and fact.id in ids:
            raise ApiError(422, "invalid_request", f"{where}: id {fact.id!r} repeats facts[{ids[fact.id]}]")
        slots[fact.slot] = i
        if fact.id is not None:
            ids[fact.id] = i
        out.append(fact.to_dict())
    return out


@router.post("/edits", status_code=202, response_model=EditsAccepted, dependencies=[WRITE])
def submit_edits(
    body: EditsIn, request: Request,
    idempotency_key: Optional[str] = Header(None, max_length=200, description="Repeat-safe submission key."),
) -> EditsAccepted:
    """Queue one fact or a list durably; answered once they are on disk. A worker applies them in batches."""
    config = request.app.state.config
    facts = _checked_facts(body, config.max_facts_per_request)
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    worker = worker_of(request)
    try:
        records = _queue(request).submit(facts, idempotency_key, digest, max_queued=config.max_queue)
    except IdempotencyConflict as e:
        raise ApiError(409, "conflict", str(e)) from None
    except QueueFull as e:
        raise ApiError(429, "too_many_requests", f"{e}; retry later",
                       {"Retry-After": str(worker.retry_after())}) from None
    worker.notify()
    return EditsAccepted(edits=[_edit_out(r) for r in records])


@router.get("/edits", response_model=EditsPage, dependencies=[READ])
def list_edits(request: Request, offset: int = Query(0, ge=0, le=10**9), limit: int = Query(50, ge=1, le=1000)) -> EditsPage:
    """Edits, newest first, with the count per state."""
    q = _queue(request)
    counts = q.counts()
    return EditsPage(total=sum(counts.values()), counts=counts, edits=[_edit_out(r) for r in q.recent(limit, offset)])


@router.get("/edits/{edit_id}", response_model=EditOut, dependencies=[READ])
def get_edit(edit_id: str, request: Request) -> EditOut:
    """State of one edit: queued, applied (with its step) or rejected (with the reason)."""
    rec = _queue(request).get(edit_id)
    if rec is None:
        raise ApiError(404, "not_found", f"no edit {edit_id!r}")
    return _edit_out(rec)


# ---------------------------------------------------------------------------------------------- facts and steps
@router.get("/facts", response_model=FactsPage, dependencies=[READ])
def list_facts(request: Request, offset: int = Query(0, ge=0, le=10**9), limit: int = Query(100, ge=1, le=1000),
               q: Optional[str] = Query(None, min_length=1, max_length=200,
                                        description="Only facts whose id, subject, target or text contain this (any case).")
               ) -> FactsPage:
    """Facts in force, oldest first (``total`` counts the matches of ``q`` when given)."""
    view = worker_of(request).view
    facts = view.facts if q is None else view.search(q)
    return FactsPage(total=len(facts), offset=offset, limit=limit,
                     facts=[_fact_out(r) for r in facts[offset: offset + limit]])


def _fact_in_force(request: Request, fact_id: str) -> FactRow:
    row = worker_of(request).view.fact(fact_id)
    if row is None:
        raise ApiError(404, "not_found", f"no fact {fact_id!r} in force")
    return row


@router.get("/facts/{fact_id}", response_model=FactOut, dependencies=[READ])
def get_fact(fact_id: str, request: Request) -> FactOut:
    return _fact_out(_fact_in_force(request, fact_id))


@router.delete("/facts/{fact_id}", response_model=StepOut, dependencies=[WRITE], responses=JOB_RUNNING)
def forget_fact(fact_id: str, request: Request) -> StepOut:
    """Forget a fact exactly (a new ledger step): the weights become the one-time solution without it."""
    _fact_in_force(request, fact_id)
    worker = worker_of(request)

    def forget(editor: Any) -> StepRecord:
        with worker.weights.write():
            return editor.forget([fact_id])

    return _on_worker(worker, forget, f"forget {fact_id!r}", _step_json)


@router.post("/steps/{step_id}/undo", response_model=StepOut, dependencies=[WRITE], responses=JOB_RUNNING)
def undo_step(step_id: int, request: Request) -> StepOut:
    """Revert a step as a new step (undo an undo to redo)."""
    worker = worker_of(request)
    if not 1 <= step_id <= worker.view.last_step:
        raise ApiError(404, "not_found", f"no step {step_id} (steps 1..{worker.view.last_step})")

    def undo(editor: Any) -> StepRecord:
        with worker.weights.write():
            return editor.undo(step_id)

    return _on_worker(worker, undo, f"undo step {step_id}", _step_json)


@router.get("/log", response_model=LogOut, dependencies=[READ])
def ledger_log(request: Request, offset: int = Query(0, ge=0, le=10**9), limit: int = Query(100, ge=1, le=1000)) -> LogOut:
    """Steps, newest first, and the queue's counts."""
    view = worker_of(request).view
    newest = view.steps[::-1]
    return LogOut(last_step=view.last_step, total=len(newest), offset=offset, limit=limit,
                  steps=[_step_out(s) for s in newest[offset: offset + limit]], queue=_queue(request).counts())


@router.post("/verify", response_model=VerifyOut, dependencies=[WRITE], responses=JOB_RUNNING)
def verify(request: Request, body: Optional[VerifyIn] = None) -> VerifyOut:
    """Re-solve the one-time problem of the facts in force and compare with the live weights; check files."""
    worker, tol = worker_of(request), (body or VerifyIn()).tol

    def run(editor: Any) -> dict:
        with worker.weights.read():
            return editor.verify(tol).to_dict()

    return _on_worker(worker, run, "verify", lambda d: VerifyOut(**d).model_dump())


def export_target(root: Optional[Path], path: str) -> Path:
    """``root/path`` resolved, refused unless it is a new path strictly inside ``root``."""
    if root is None:
        raise ApiError(403, "forbidden", "export is disabled: start the service with --export-root DIR")
    if "\x00" in path or Path(path).is_absolute():
        raise ApiError(400, "bad_request", f"export path {path!r} must be relative to the export root")
    base = root.resolve()
    target = (base / path).resolve()
    if target == base or not target.is_relative_to(base):
        raise ApiError(400, "bad_request", f"export path {path!r} leaves the export root")
    if target.exists():
        raise ApiError(409, "conflict", f"export path {path!r} exists already")
    return target


@router.post("/export", response_model=ExportOut, dependencies=[WRITE], responses=JOB_RUNNING)
def export(body: ExportIn, request: Request) -> ExportOut:
    """Write the edited model (HF directory) or its weight deltas to a new directory under the export root."""
    root_dir = request.app.state.config.export_root
    export_target(root_dir, body.path)  # a bad path is refused before it waits for the worker
    worker = worker_of(request)

    def run(editor: Any) -> ExportOut:
        # checked again where it is written, on the one thread that writes exports: nothing can appear
        # at the target or turn a component into a symlink between the check and the write
        target, root = export_target(root_dir, body.path), root_dir.resolve()
        with worker.weights.read():
            path = editor.export(target, delta=body.delta, delta_dtype=body.delta_dtype)
            step = editor.ledger.last_step
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return ExportOut(path=str(path.resolve().relative_to(root)), delta=body.delta, bytes=size, step=step)

    return _on_worker(worker, run, "export", lambda out: out.model_dump())
