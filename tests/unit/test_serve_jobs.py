"""Backpressure and jobs that keep their word (tiny llama, in process): a bounded queue answering 429
with Retry-After, timed-out jobs cancelled before they start or answered 202 with a job to poll,
write scope for verify and export, the export target checked on the thread that writes it, failed steps
that keep their facts queued unless the facts were refused, and retention of applied entries."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
from serve_helpers import READ_TOKEN, auth, fact, serve_client, wait_settled

from seqedit.serve.edit_queue import EditQueue, QueueFull
from seqedit.serve.errors import ApiError
from seqedit.serve.jobs import JobRunning, Jobs


def submit(client, body, status=202, **headers):
    r = client.post("/v1/edits", json=body, headers={**auth(), **headers})
    assert r.status_code == status, r.text
    return r


def test_a_full_queue_answers_429_with_retry_after_and_stores_nothing(tmp_path):
    with serve_client(tmp_path, max_queue=4, max_wait_s=1000.0, max_batch=100) as c:  # the worker waits
        first = submit(c, {"facts": [fact(1), fact(2), fact(3)]}, **{"Idempotency-Key": "k1"}).json()["edits"]
        r = submit(c, {"facts": [fact(4), fact(5)]}, status=429)
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "too_many_requests"
        assert "limit of 4" in r.json()["error"]["message"]
        assert c.get("/v1/edits", headers=auth()).json()["counts"]["queued"] == 3  # nothing of it was stored
        again = submit(c, {"facts": [fact(1), fact(2), fact(3)]}, **{"Idempotency-Key": "k1"}).json()["edits"]
        assert [e["id"] for e in again] == [e["id"] for e in first]  # a replay is not a new submission
        last = submit(c, fact(6)).json()["edits"]
        submit(c, fact(7), status=429)
        c.app.state.config.max_wait_s = 0.05
        c.app.state.worker.notify()
        states = wait_settled(c, [e["id"] for e in first + last])
        assert {s["state"] for s in states.values()} == {"applied"}
        submit(c, fact(8))  # room again


def test_the_queue_bound_holds_under_concurrent_submissions(tmp_path):
    q = EditQueue(tmp_path / "q.sqlite")
    outcomes: list[str] = []

    def one(i: int) -> None:
        try:
            q.submit([fact(i)], max_queued=25)
            outcomes.append("ok")
        except QueueFull:
            outcomes.append("full")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 25 == q.counts()["queued"] and outcomes.count("full") == 35
    q.close()


def test_the_job_deque_is_bounded():
    jobs = Jobs(max_jobs=1, describe_error=lambda e, what: ApiError(409, "conflict", str(e)))
    jobs.submit(lambda ed: 1, "first", lambda r: r, retry_after=3)
    with pytest.raises(ApiError) as e:
        jobs.submit(lambda ed: 2, "second", lambda r: r, retry_after=3)
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "3"}
    jobs.run_waiting(None, lambda: None)
    assert jobs.submit(lambda ed: 3, "third", lambda r: r, retry_after=3).state == "queued"


class _SlowFuture(concurrent.futures.Future):
    """A future whose wait runs out with ``concurrent.futures.TimeoutError`` (its own class on Python
    3.10, where ``except TimeoutError`` misses it)."""

    def result(self, timeout=None):
        raise concurrent.futures.TimeoutError()


def test_a_timeout_cancels_a_waiting_job_and_reports_a_running_one():
    jobs = Jobs(max_jobs=4, describe_error=lambda e, what: ApiError(409, "conflict", str(e)))
    waiting = jobs.submit(lambda ed: 1, "forget 'x'", lambda r: r, retry_after=1)
    waiting.future = _SlowFuture()
    with pytest.raises(ApiError) as e:
        jobs.wait(waiting, 0.01)
    assert e.value.status == 503 and "cancelled and nothing was done" in e.value.message
    jobs.run_waiting(None, lambda: None)
    assert waiting.state == "cancelled" and waiting.started is None  # the worker skipped it
    running = jobs.submit(lambda ed: 2, "verify", lambda r: r, retry_after=1)
    running.future = _SlowFuture()
    running.future.set_running_or_notify_cancel()
    with pytest.raises(JobRunning) as r:
        jobs.wait(running, 0.01)
    assert r.value.job is running


def _slow_steps(worker, seconds: float):
    bank = worker.editor.bank
    original, mid = bank.write, threading.Event()

    def slow(layer, delta):
        original(layer, delta)
        mid.set()
        time.sleep(seconds)

    bank.write = slow
    return mid, lambda: setattr(bank, "write", original)


def test_timed_out_jobs_keep_their_word(tmp_path):
    with serve_client(tmp_path, job_timeout_s=0.3) as c:
        worker = c.app.state.worker
        wait_settled(c, [e["id"] for e in submit(c, fact(1, id="keep")).json()["edits"]])
        mid, restore = _slow_steps(worker, 0.6)
        try:
            ids = [e["id"] for e in submit(c, fact(2)).json()["edits"]]
            assert mid.wait(30)
            r = c.delete("/v1/facts/keep", headers=auth())  # the worker is mid-step: the job cannot start
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout", r.text
            assert "nothing was done" in r.json()["error"]["message"] and r.headers["Retry-After"]
            wait_settled(c, ids)
        finally:
            restore()
        time.sleep(0.2)
        assert c.get("/v1/facts/keep", headers=auth()).status_code == 200  # never a silent later success
        assert c.get("/v1/log", headers=auth()).json()["steps"][0]["kind"] == "apply"

        original = worker.editor.verify

        def slow_verify(*a, **kw):
            time.sleep(0.8)
            return original(*a, **kw)

        worker.editor.verify = slow_verify
        try:
            r = c.post("/v1/verify", headers=auth())
        finally:
            worker.editor.verify = original
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["state"] == "running" and job["what"] == "verify" and r.headers["Location"] == f"/v1/jobs/{job['id']}"
        deadline = time.monotonic() + 30
        while (polled := c.get(f"/v1/jobs/{job['id']}", headers=auth(READ_TOKEN)).json())["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert polled["state"] == "done" and polled["result"]["ok"] is True
        assert c.get("/v1/jobs/nope", headers=auth()).status_code == 404




def test_the_export_target_is_checked_where_it_is_written(tmp_path):
    with serve_client(tmp_path) as c:
        worker = c.app.state.worker
        (tmp_path / "exports").mkdir()
        release, started = threading.Event(), threading.Event()
        original = worker.editor.verify

        def held_verify(*a, **kw):
            started.set()
            release.wait(30)
            return original(*a, **kw)

        worker.editor.verify = held_verify
        out = {}
        try:
            threading.Thread(target=lambda: out.update(v=c.post("/v1/verify", headers=auth()))).start()
            assert started.wait(30)
            t = threading.Thread(target=lambda: out.update(e=c.post("/v1/export", json={"path": "m"}, headers=auth())))
            t.start()
            time.sleep(0.3)  # the export passed the request thread's check and waits for the worker
            (tmp_path / "exports" / "m").mkdir()
            (tmp_path / "exports" / "m" / "mine").write_text("not the model")
            release.set()
            t.join(60)
        finally:
            worker.editor.verify = original
        assert out["e"].status_code == 409 and "exists already" in out["e"].json()["error"]["message"]
        assert sorted(p.name for p in (tmp_path / "exports" / "m").iterdir()) == ["mine"]
        for path, body in (("/v1/verify", {}), ("/v1/export", {"path": "x"})):
            r = c.post(path, json=body, headers=auth(READ_TOKEN))
            assert r.status_code == 403, (path, r.text)


def test_an_internal_failure_keeps_the_batch_queued_and_retries_without_bisecting(tmp_path):
    with serve_client(tmp_path, max_wait_s=0.3) as c:
        worker = c.app.state.worker
        original, sizes = worker.editor.apply, []

        def flaky(facts, *a, **kw):
            sizes.append(len(facts))
            if len(sizes) <= 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            return original(facts, *a, **kw)

        worker.editor.apply = flaky
        try:
            ids = [e["id"] for e in submit(c, {"facts": [fact(1), fact(2), fact(3), fact(4)]}).json()["edits"]]
            t0 = time.monotonic()
            states = wait_settled(c, ids, timeout=60)
            waited = time.monotonic() - t0
        finally:
            worker.editor.apply = original
        assert {s["state"] for s in states.values()} == {"applied"}  # none rejected for the server's failure
        assert sizes == [4, 4, 4] and worker.steps_failed == 2  # never split: the facts were not at fault
        assert waited >= 1.0 + 2.0  # backed off 1 s, then 2 s
        assert worker.backoff_s == 0.0  # reset by the step that worked


def test_applied_entries_older_than_the_retention_are_pruned(tmp_path):
    with serve_client(tmp_path, keep_applied_days=1.0) as c:
        worker, queue = c.app.state.worker, c.app.state.queue
        old = [e["id"] for e in submit(c, {"facts": [fact(1), fact(2)]}, **{"Idempotency-Key": "old"}).json()["edits"]]
        wait_settled(c, old)
        new = [e["id"] for e in submit(c, fact(3)).json()["edits"]]
        wait_settled(c, new)
        two_days_ago = time.time() - 2 * 86400
        with queue._lock:
            queue.conn.execute("UPDATE edits SET updated = ?, created = ?", (two_days_ago, two_days_ago))
            queue.conn.execute("UPDATE requests SET created = ?", (two_days_ago,))
        worker._pruned_at = 0.0
        worker.notify()
        deadline = time.monotonic() + 10
        while c.get(f"/v1/edits/{old[0]}", headers=auth()).status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get(f"/v1/edits/{old[1]}", headers=auth()).status_code == 404
        assert c.get(f"/v1/edits/{new[0]}", headers=auth()).json()["state"] == "applied"  # the newest step's stay
        assert queue.max_applied_step() == c.get("/v1/log", headers=auth()).json()["last_step"]
        assert {f["subject"] for f in c.get("/v1/facts", headers=auth()).json()["facts"]} >= {"Place 1", "Place 2"}
