"""Shared by the serve tests: a tiny-model app (in process, with httpx) and helpers to wait for the queue."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fastapi.testclient import TestClient

from seqedit.serve import ServeConfig, TokenTable, create_app
from seqedit.testing import tiny_model

WRITE_TOKEN = "w" * 24
READ_TOKEN = "r" * 24
EDITOR_OPTIONS = {"layers": (1, 2), "stats_tokens": 2000, "lam": 10.0, "v_steps": 2}


def auth(token: str = WRITE_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fact(i: int, variant: int = 0, **kw: Any) -> dict[str, Any]:
    return {"prompt": "{} is located in", "subject": f"Place {i}", "target": f"Town {i}-{variant}", **kw}


def make_config(tmp: Path, **kw: Any) -> ServeConfig:
    kw = {"tokens": TokenTable(read=(READ_TOKEN,), write=(WRITE_TOKEN,)), "editor_options": dict(EDITOR_OPTIONS),
          "max_wait_s": 0.05, "export_root": tmp / "exports", "max_tokens": 32, "model": "tiny-llama"} | kw
    return ServeConfig(ledger=tmp / "ledger", **kw)


@contextmanager
def serve_client(tmp: Path, lm=None, **kw: Any) -> Iterator[TestClient]:
    """A TestClient on a running app (worker started, ready) over a tiny llama ledger in ``tmp``."""
    config = make_config(tmp, **kw)
    app = create_app(config, load=(lambda: lm) if lm is not None else (lambda: tiny_model("llama")))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz", headers=auth(READ_TOKEN)).status_code == 200:
            return
        time.sleep(0.02)
    raise TimeoutError(client.app.state.worker.status)


def wait_settled(client: TestClient, edit_ids: list[str], timeout: float = 60) -> dict[str, dict]:
    """Poll until every edit is applied or rejected; returns their final states."""
    deadline = time.monotonic() + timeout
    out: dict[str, dict] = {}
    while time.monotonic() < deadline:
        for i in edit_ids:
            if i not in out:
                r = client.get(f"/v1/edits/{i}", headers=auth(READ_TOKEN)).json()
                if r["state"] != "queued":
                    out[i] = r
        if len(out) == len(edit_ids):
            return out
        time.sleep(0.02)
    raise TimeoutError(f"{len(edit_ids) - len(out)} edits still queued")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def applied_in_ledger(ledger: Path) -> dict[str, list[int]]:
    """``{edit id: [apply steps whose added facts carry it]}`` read from the ledger journal (read-only)."""
    from seqedit.ledger import Ledger
    from seqedit.serve.edit_queue import EDIT_META_KEY

    out: dict[str, list[int]] = {}
    with Ledger(ledger) as L:
        for step in L.steps():
            if step.kind == "apply":
                for row in L.rows_added(step.id):
                    out.setdefault(row.fact.meta.get(EDIT_META_KEY), []).append(step.id)
    return out


def wait_http_ready(base: str, token: str, timeout: float = 60) -> None:
    """Poll ``base``/readyz until it answers 200."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", headers=auth(token), timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base} did not become ready")


def start_tiny_server(tmp: Path, *extra: str) -> tuple[Any, str]:
    """``seqedit serve`` as a real process on a tiny Llama saved under ``tmp`` (layers 1–2, λ 10, two value
    steps), with a read token file and the write token in its environment; ``extra`` are more CLI
    options. Returns the process and its base URL (the caller waits for readiness and stops it)."""
    import os
    import subprocess
    import sys

    model = tmp / "tiny-llama"
    lm = tiny_model("llama")
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    (tmp / "tokens").write_text(f"read {READ_TOKEN}\n")
    port = free_port()
    env = {**os.environ, "SEQEDIT_API_TOKEN": WRITE_TOKEN, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "seqedit.cli", "serve", "--ledger", str(tmp / "ledger"), "--model", str(model),
           "--layers", "1,2", "--lam", "10", "--v-steps", "2", "--stats-tokens", "2000", "--port", str(port),
           "--token-file", str(tmp / "tokens"), "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, env=env), f"http://127.0.0.1:{port}"

