"""Crash safety of the service: a real server process (uvicorn, tiny llama) is SIGKILLed at random
moments while clients submit facts and the queue drains (≥ 20 kills). After each restart the ledger
verifies, and at the end every edit answered 202 is applied exactly once (or rejected with a reason)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from serve_helpers import WRITE_TOKEN, applied_in_ledger, auth, fact, free_port, wait_http_ready

from seqedit.serve.edit_queue import EditQueue

KILLS = 20
HERE = Path(__file__).resolve().parent


class Submitter(threading.Thread):
    """Posts small lists of facts as fast as the server takes them; keeps the ids of every 202."""

    def __init__(self, base: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.base, self.rng, self.accepted, self.running = base, random.Random(seed), [], True
        self.n = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.base, headers=auth(WRITE_TOKEN), timeout=5) as c:
            while self.running:
                self.n += 1
                facts = [fact(self.rng.randrange(40), self.n * 10 + j) for j in range(self.rng.randint(1, 3))]
                facts = list({f["subject"]: f for f in facts}.values())  # one fact per slot in a request
                try:
                    r = c.post("/v1/edits", json={"facts": facts})
                except httpx.TransportError:  # the server is down (or died mid-request): nothing promised
                    time.sleep(0.02)
                    continue
                if r.status_code == 202:
                    self.accepted += [e["id"] for e in r.json()["edits"]]
                time.sleep(0.04)


def test_sigkill_while_the_queue_drains_loses_nothing_and_applies_nothing_twice(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen([sys.executable, str(HERE / "serve_crash_server.py"), str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(2024)
    submitter = Submitter(base, 7)
    verified = 0
    try:
        assert server.stdout.readline().strip() == "ready"
        submitter.start()
        for life in range(KILLS + 1):
            server.stdin.write(f"go {port}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            t_go = time.monotonic()
            wait_http_ready(base, WRITE_TOKEN)  # ready: reopened, reconciled and verified at start
            rep = httpx.post(f"{base}/v1/verify", headers=auth(WRITE_TOKEN), timeout=30).json()
            assert rep["ok"], rep
            verified += 1
            if life == KILLS:
                break
            t_ready = time.monotonic()
            time.sleep(rng.uniform(0.05, 0.5))
            os.kill(pid, signal.SIGKILL)
            print(f"life {life}: ready after {t_ready - t_go:.2f}s, killed after {time.monotonic() - t_ready:.2f}s")
            assert server.stdout.readline().strip() == "done"
        submitter.running = False
        submitter.join()
        deadline = time.monotonic() + 60  # the last life drains the queue
        while httpx.get(f"{base}/v1/log", headers=auth(WRITE_TOKEN)).json()["queue"]["queued"]:
            assert time.monotonic() < deadline, "the queue did not drain"
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)  # graceful shutdown
        assert server.stdout.readline().strip() == "done"
    finally:
        submitter.running = False
        server.stdin.close()
        server.kill()
        server.wait()

    accepted = submitter.accepted
    assert verified == KILLS + 1 and len(accepted) >= 100
    q = EditQueue(tmp_path / "ledger" / "serve-queue.sqlite")
    try:
        states = {r.id: r for r in q.all()}
    finally:
        q.close()
    in_ledger = applied_in_ledger(tmp_path / "ledger")
    assert set(accepted) <= set(states)  # every 202 was durable
    for edit_id in accepted:
        rec = states[edit_id]
        if rec.state == "applied":
            assert in_ledger.get(edit_id) == [rec.step], (edit_id, in_ledger.get(edit_id), rec.step)
        else:
            assert rec.state == "rejected" and rec.reason and edit_id not in in_ledger
    applied = sum(states[i].state == "applied" for i in accepted)
    print(f"\nserve crash test: {KILLS} SIGKILLs, {verified} verified restarts, {len(accepted)} edits accepted (202), "
          f"{applied} applied exactly once, {len(accepted) - applied} rejected")
    assert applied >= 0.9 * len(accepted)
