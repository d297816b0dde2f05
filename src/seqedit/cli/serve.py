"""``seqedit serve``: the HTTP service that keeps a deployed model's facts current (``docs/serve.md``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .common import BaseOpt, DeviceMapOpt, DtypeOpt, LamOpt, LayersOpt, VStepsOpt, app, fail, parse_layers


@app.command()
def serve(
    ledger: Path = typer.Option(..., "--ledger", "-l", help="Ledger directory (created on the first edit)."),
    model: Optional[str] = BaseOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    method: Optional[str] = typer.Option(None, help="Editing method of a new ledger (default: memit, or the ledger's)."),
    alignment: Optional[str] = typer.Option(None, help="Method alignment (default: the method's first)."),
    layers: Optional[str] = LayersOpt,
    lam: Optional[float] = LamOpt,
    v_steps: Optional[int] = VStepsOpt,
    stats_tokens: Optional[int] = typer.Option(None, "--stats-tokens", help="Tokens for Σ₀ of a new ledger (default: preset)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (not loopback: a token is required)."),
    port: int = typer.Option(8000, help="TCP port."),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file", help="Lines 'read TOKEN' / 'write TOKEN'; SEQEDIT_API_TOKEN adds one write token."),
    export_root: Optional[Path] = typer.Option(None, "--export-root", help="POST /v1/export writes only below this directory."),
    max_batch: int = typer.Option(64, "--max-batch", help="Most facts per ledger step."),
    max_wait_s: float = typer.Option(0.5, "--max-wait-s", help="Longest a queued fact waits for a fuller batch."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Largest max_tokens a completion may ask for."),
    max_queue: int = typer.Option(10_000, "--max-queue", help="Most edits queued; more answer 429 with Retry-After."),
    max_jobs: int = typer.Option(64, "--max-jobs", help="Most forget/undo/verify/export jobs waiting (429 beyond)."),
    keep_applied_days: Optional[float] = typer.Option(
        None, "--keep-applied-days", help="Delete applied queue entries older than this (default: keep them)."),
    batch_rows: int = typer.Option(16, "--batch-rows", help="Greedy prompts decoding together, joining and leaving between steps (1: no batching)."),
    workers: int = typer.Option(1, "--workers", help="Must be 1: one process owns the editor and its ledger."),
    log_level: str = typer.Option("info", "--log-level", help="debug | info | warning | error."),
) -> None:
    """Serve the ledger's model over HTTP: durable bounded edit queue, facts, forget/undo, verify, export,
    /metrics, and OpenAI-shaped /v1/completions and /v1/chat/completions on the live edited model."""
    try:
        import uvicorn

        from ..serve import ServeConfig, create_app, read_token_file
    except ImportError as e:
        fail(f"seqedit serve needs its extra ({e.name} is missing): pip install 'seqedit[serve]'")
    from ..errors import SeqEditError
    from ..ledger import Ledger
    from ..serve.config import TOKEN_ENV
    from ..serve.logs import configure_logging

    if workers != 1:
        fail(f"--workers {workers}: seqedit serve runs as one process, because one process owns the editor, its "
             "ledger connection and the weights it edits (more processes would apply edits to separate copies). "
             "Scale reads with replicas of an exported model behind a reverse proxy (docs/serve.md)")
    if model is None and not Ledger.exists(ledger):
        fail(f"--model is needed to start the new ledger {ledger}")
    options = {"method": method, "alignment": alignment, "layers": parse_layers(layers), "lam": lam,
               "v_steps": v_steps, "stats_tokens": stats_tokens}
    try:
        tokens = read_token_file(token_file, os.environ.get(TOKEN_ENV))
        from ..models.load import parse_device_map, resolve_dtype

        if dtype is not None:
            resolve_dtype(dtype)  # a bad --dtype fails now, not on the worker after start
        config = ServeConfig(ledger=ledger, model=model, dtype=dtype, device_map=parse_device_map(device_map),
                             editor_options=options, host=host, port=port,
                             tokens=tokens, export_root=export_root, max_batch=max_batch, max_wait_s=max_wait_s,
                             max_tokens=max_tokens, max_queue=max_queue, max_jobs=max_jobs,
                             keep_applied_days=keep_applied_days, batch_rows=batch_rows)
        configure_logging(log_level)
        application = create_app(config)
    except (SeqEditError, OSError, ValueError) as e:
        fail(str(e))
    uvicorn.run(application, host=host, port=port, log_config=None, access_log=False,
                log_level=log_level, timeout_graceful_shutdown=30)
