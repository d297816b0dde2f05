"""Throughput of `seqedit serve` completions with and without continuous batching (serve/batching.py), on
the embedded SmolLM2-135M by default: tokens/s for 1, 4 and 8 concurrent clients against the same
requests one at a time, and p50/p99 latency of 8 clients while edits are applied in between.

    SEQEDIT_CACHE=... .venv/bin/python benchmarks/serve_throughput.py [--requests 32] [--max-tokens 32]
        [--edits 4] [--out docs/serve-throughput.json] [--tiny]

Every request is greedy and distinct (``Place {i} ...`` prompts); completion tokens come from ``usage``.
The service runs in process under uvicorn on loopback; clients are threads with their own httpx client.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

TOKEN = "b" * 24
PROMPTS = ["The mother tongue of {} is", "{} is located in the country of", "The capital city of {} is",
           "{} was born in the city of"]
SUBJECTS = ["Danielle Darrieux", "the Eiffel Tower", "Toko Yasuda", "Autonomous University of Madrid", "Thomas Joannes Stieltjes",
            "Apple A5", "Kalkan", "Michel Denisot"]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def serve(tmp: Path, port: int, lm, batch_rows: int, tiny: bool):
    from seqedit.serve import ServeConfig, TokenTable, create_app

    options = ({"layers": (1, 2), "stats_tokens": 2000, "lam": 10.0, "v_steps": 2} if tiny else {})
    config = ServeConfig(ledger=tmp / f"ledger-{batch_rows}", model="smollm2-135m", port=port, max_tokens=256,
                         tokens=TokenTable(write=(TOKEN,)), editor_options=options, batch_rows=batch_rows,
                         batch_wait_s=0.01, max_wait_s=0.05, verify_on_start=False)
    server = uvicorn.Server(uvicorn.Config(create_app(config, load=lambda: lm), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).status_code == 200:
                return server, thread, base
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the service did not become ready")


def run_clients(base: str, clients: int, requests: int, max_tokens: int, edits: int = 0) -> dict:
    """``requests`` distinct greedy completions from ``clients`` threads; optionally ``edits`` facts
    submitted one by one, evenly, while they run."""
    lat: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as c:
            for i in range(k, requests, clients):
                prompt = PROMPTS[i % len(PROMPTS)].format(SUBJECTS[(i // len(PROMPTS)) % len(SUBJECTS)]) + f" ({i})"
                t = time.perf_counter()
                r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
                r.raise_for_status()
                with lock:
                    lat.append(1000 * (time.perf_counter() - t))
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    def editor() -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
            for j in range(edits):
                if stop.wait(1.0):
                    return
                c.post("/v1/edits", json={"prompt": "{} is located in", "subject": f"Benchmark place {j}",
                                          "target": f"Town {j}"}).raise_for_status()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    side = threading.Thread(target=editor) if edits else None
    t0 = time.perf_counter()
    for t in threads + ([side] if side else []):
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    if side:
        side.join()
    return {"clients": clients, "requests": requests, "tokens": tokens[0], "seconds": round(wall, 2),
            "tokens_per_s": round(tokens[0] / wall, 1), "p50_ms": round(_pct(lat, 0.5), 1),
            "p99_ms": round(_pct(lat, 0.99), 1), "mean_ms": round(statistics.mean(lat), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--edits", type=int, default=4, help="facts submitted while 8 clients generate (0: none)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama instead of the embedded model")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import seqedit
    from seqedit.testing import tiny_model

    lm = tiny_model("llama") if args.tiny else seqedit.load_model("smollm2-135m")
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    rows, port = [], 8931
    with tempfile.TemporaryDirectory() as tmp:
        for batch_rows in (1, 16):
            server, thread, base = serve(Path(tmp), port, lm, batch_rows, args.tiny)
            port += 1
            try:
                run_clients(base, 1, 2, 4)  # warm-up
                for clients in (1, 4, 8):
                    r = run_clients(base, clients, args.requests, args.max_tokens)
                    rows.append({"batching": batch_rows > 1, **r})
                    print(rows[-1], flush=True)
                if batch_rows > 1 and args.edits:
                    r = run_clients(base, 8, args.requests, args.max_tokens, edits=args.edits)
                    rows.append({"batching": True, "edits_during": args.edits, **r})
                    print(rows[-1], flush=True)
            finally:
                server.should_exit = True
                thread.join(60)
    seq = next(r for r in rows if not r["batching"] and r["clients"] == 1)["tokens_per_s"]
    print(f"\nmodel {lm.name} on {device}; {args.requests} requests x {args.max_tokens} tokens, greedy\n")
    print("| batching | clients | edits during | tokens/s | × one at a time | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'yes' if r['batching'] else 'no'} | {r['clients']} | {r.get('edits_during', 0)} | {r['tokens_per_s']} | "
              f"{r['tokens_per_s'] / seq:.2f} | {r['p50_ms']} | {r['p99_ms']} |")
    if args.out:
        args.out.write_text(json.dumps({"model": lm.name, "device": device, "requests": args.requests,
                                        "max_tokens": args.max_tokens, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
