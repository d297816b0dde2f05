"""The FastAPI application of ``seqedit serve``: health routes, the page, the ``/v1`` API, the
OpenAPI schema (behind read auth), JSON errors, body limits, access logs, and the worker's lifetime
(started with the app; on shutdown it finishes the step in progress and closes the ledger)."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..version import __version__
from ..models.load import LoadedModel
from .auth import require
from .config import ServeConfig
from .edit_queue import EditQueue
from .errors import ApiError, install_handlers
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .middleware import AccessLog, BodyLimit
from .page import render_page
from . import chat, completions, routes
from .schemas import Health
from .worker import Worker

__all__ = ["create_app", "default_loader"]


def default_loader(config: ServeConfig) -> Callable[[], LoadedModel]:
    """Load ``config.model``, else the base model the ledger records (the ledger must exist then), in
    ``config.dtype``, else the dtype the ledger records, placed by ``config.device_map``."""

    def load() -> LoadedModel:
        from ..ledger import Ledger
        from ..ledger.manifest import recorded_base
        from ..models.load import load_model

        base = recorded_base(config.ledger) if Ledger.exists(config.ledger) else {}
        name = config.model or base["name"]
        return load_model(name, dtype=config.dtype or base.get("dtype"), device_map=config.device_map)

    return load


def create_app(config: ServeConfig, load: Callable[[], LoadedModel] | None = None) -> FastAPI:
    """The app; ``load()`` returns the base model (default :func:`default_loader`), called on the worker."""
    queue = EditQueue(config.queue_path)
    worker = Worker(config, queue, load or default_loader(config))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            queue.close()

    app = FastAPI(title="seqedit serve", version=__version__, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None,
                  description="Keeps a deployed model's facts current: durable edit queue, exact forget/undo, "
                              "OpenAI-shaped completions on the live edited model.")
    app.state.config, app.state.queue, app.state.worker = config, queue, worker
    app.state.metrics = metrics = Metrics(worker, queue)
    worker.on_step = metrics.observe_step
    app.state.started = time.time()
    app.state.model_id = config.model or "seqedit"
    install_handlers(app)
    app.include_router(routes.router)
    app.include_router(completions.router)
    app.include_router(chat.router)

    @app.get("/healthz", response_model=Health, tags=["operations"])
    def healthz() -> Health:
        """Liveness (no token needed): the process answers."""
        return Health(status="ok", ready=worker.ready)

    @app.get("/readyz", response_model=Health, tags=["operations"], dependencies=[Depends(require("read"))])
    def readyz() -> Any:
        """Readiness: the model is loaded and the ledger was reopened and verified (503 until then)."""
        if not worker.ready:
            raise ApiError(503, "unavailable", f"not ready: {worker.status}")
        return Health(status="ready", step=worker.view.last_step, model=app.state.model_id)

    @app.get("/metrics", tags=["operations"], response_class=Response, dependencies=[Depends(require("read"))],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    def prometheus() -> Response:
        """Queue depth, facts in force, steps and their seconds, request latency (Prometheus text format)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require("read"))])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        """The page shell (no data, no token needed); it reads and edits through the API with the user's token."""
        return HTMLResponse(render_page(app.state.model_id), headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                       "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        })

    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(AccessLog, metrics=metrics)
    return app
