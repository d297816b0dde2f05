"""Load on loopback: `seqedit serve` (the real command, tiny llama) takes 500 facts from 8 concurrent
clients, one fact per request, while 2 more clients ask for completions. Every accepted fact ends
applied (exactly once in the ledger) or rejected with a reason; p50/p99 latencies are printed (and written
to $SEQEDIT_SERVE_LOAD_OUT as JSON when set)."""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import httpx
from serve_helpers import READ_TOKEN, WRITE_TOKEN, applied_in_ledger, auth, fact, start_tiny_server, wait_http_ready


FACTS, SUBMITTERS, GENERATORS = 500, 8, 2


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def test_500_facts_from_8_clients_while_others_generate(tmp_path: Path) -> None:
    server, base = start_tiny_server(tmp_path, "--max-batch", "64", "--max-wait-s", "0.2")
    edit_ms: list[float] = []
    gen_ms: list[float] = []
    accepted: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def submit(k: int) -> None:
        with httpx.Client(base_url=base, headers=auth(WRITE_TOKEN), timeout=30) as c:
            for i in range(k, FACTS, SUBMITTERS):
                t = time.perf_counter()
                r = c.post("/v1/edits", json=fact(i % 400, i))  # 100 slots corrected twice
                ms = 1000 * (time.perf_counter() - t)
                assert r.status_code == 202, r.text
                with lock:
                    edit_ms.append(ms)
                    accepted.append(r.json()["edits"][0]["id"])

    def generate(k: int) -> None:
        with httpx.Client(base_url=base, headers=auth(READ_TOKEN), timeout=60) as c:
            while not done.is_set():
                t = time.perf_counter()
                r = c.post("/v1/completions", json={"prompt": f"Place {k} is located in", "max_tokens": 16,
                                                    "temperature": 0})
                assert r.status_code == 200, r.text
                gen_ms.append(1000 * (time.perf_counter() - t))

    try:
        t_start = time.perf_counter()
        wait_http_ready(base, READ_TOKEN, timeout=120)
        t0 = time.perf_counter()
        startup = t0 - t_start
        gens = [threading.Thread(target=generate, args=(k,), daemon=True) for k in range(GENERATORS)]
        subs = [threading.Thread(target=submit, args=(k,)) for k in range(SUBMITTERS)]
        for t in gens + subs:
            t.start()
        for t in subs:
            t.join()
        t_submitted = time.perf_counter() - t0
        with httpx.Client(base_url=base, headers=auth(READ_TOKEN), timeout=30) as c:
            deadline = time.monotonic() + 120
            while (log := c.get("/v1/log").json())["queue"]["queued"]:
                assert time.monotonic() < deadline, "the queue did not drain"
                time.sleep(0.05)
            t_drained = time.perf_counter() - t0
            done.set()
            for t in gens:
                t.join()
            states = {i: c.get(f"/v1/edits/{i}").json() for i in accepted}
    finally:
        done.set()
        t_stop = time.perf_counter()
        server.send_signal(signal.SIGTERM)  # graceful: finishes the step in progress
        rc = server.wait(60)
        print(f"startup {startup:.1f}s, shutdown {time.perf_counter() - t_stop:.1f}s, checks {t_stop - t0:.1f}s")
    assert rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    assert len(accepted) == FACTS == len(set(accepted))
    in_ledger = applied_in_ledger(tmp_path / "ledger")
    for edit_id, s in states.items():
        if s["state"] == "applied":
            assert in_ledger.get(edit_id) == [s["step"]]
        else:
            assert s["state"] == "rejected" and s["reason"] and edit_id not in in_ledger
    applied = sum(s["state"] == "applied" for s in states.values())
    result = {
        "facts": FACTS, "submitters": SUBMITTERS, "generators": GENERATORS, "applied": applied,
        "rejected": FACTS - applied, "steps": log["last_step"], "submit_s": round(t_submitted, 2),
        "drained_s": round(t_drained, 2), "completions": len(gen_ms),
        "edits_ms": {"p50": round(statistics.median(edit_ms), 1), "p99": round(_pct(edit_ms, 0.99), 1)},
        "completions_ms": {"p50": round(statistics.median(gen_ms), 1), "p99": round(_pct(gen_ms, 0.99), 1)},
    }
    print("\n| request | n | p50 ms | p99 ms |\n|---|---|---|---|")
    print(f"| POST /v1/edits | {len(edit_ms)} | {result['edits_ms']['p50']} | {result['edits_ms']['p99']} |")
    print(f"| POST /v1/completions (16 tokens) | {len(gen_ms)} | {result['completions_ms']['p50']} | "
          f"{result['completions_ms']['p99']} |")
    print(json.dumps(result))
    if out := os.environ.get("SEQEDIT_SERVE_LOAD_OUT"):
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    assert applied == FACTS and len(gen_ms) >= GENERATORS
