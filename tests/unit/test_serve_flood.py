"""A flood against a bounded queue: the real `seqedit serve --max-queue 500` (tiny llama) takes 2,000
one-fact submissions from 16 concurrent clients that do not retry. Some answers are 429 with a
Retry-After; every edit answered 202 ends applied exactly once in the ledger (none lost)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
from serve_helpers import READ_TOKEN, WRITE_TOKEN, applied_in_ledger, auth, fact, start_tiny_server, wait_http_ready


EDITS, CLIENTS, MAX_QUEUE = int(os.environ.get("SEQEDIT_FLOOD_EDITS", 2000)), 16, 500


def test_a_flood_gets_429s_and_loses_none_of_the_accepted(tmp_path: Path) -> None:
    server, base = start_tiny_server(tmp_path, "--max-batch", "16", "--max-wait-s", "0.2", "--max-queue", str(MAX_QUEUE))
    accepted: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def flood(k: int) -> None:
        with httpx.Client(base_url=base, headers=auth(WRITE_TOKEN), timeout=60) as c:
            for i in range(k, EDITS, CLIENTS):
                r = c.post("/v1/edits", json=fact(i, 0))
                assert r.status_code in (202, 429), r.text
                with lock:
                    if r.status_code == 202:
                        accepted.append(r.json()["edits"][0]["id"])
                    else:
                        assert int(r.headers["Retry-After"]) >= 1
                        refused.append(r.json()["error"]["message"])

    try:
        wait_http_ready(base, READ_TOKEN)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=flood, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        submit_s = time.perf_counter() - t0
        with httpx.Client(base_url=base, headers=auth(READ_TOKEN), timeout=30) as c:
            deadline = time.monotonic() + 300
            while (counts := c.get("/v1/log").json()["queue"])["queued"]:
                assert time.monotonic() < deadline, counts
                time.sleep(0.2)
        print(f"\nflood: {EDITS} edits from {CLIENTS} clients, --max-queue {MAX_QUEUE}: {len(accepted)} accepted, "
              f"{len(refused)} answered 429; submitted in {submit_s:.1f} s; final counts {counts}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert len(accepted) + len(refused) == EDITS and refused and accepted
    assert counts["applied"] == len(accepted) and counts["rejected"] == 0
    in_ledger = applied_in_ledger(tmp_path / "ledger")
    assert all(len(in_ledger.get(e, [])) == 1 for e in accepted)  # each accepted edit applied exactly once
    assert set(in_ledger) == set(accepted)
