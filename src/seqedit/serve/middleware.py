"""ASGI middleware: bounded request bodies (413 before the app reads more than the limit) and one
structured access-log line per request (method, path, status, milliseconds; never headers or bodies)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Awaitable, Callable

from fastapi import HTTPException

from .errors import error_body

__all__ = ["AccessLog", "BodyLimit"]

log = logging.getLogger("seqedit.serve")
Scope = dict[str, Any]
ASGI = Callable[[Scope, Callable, Callable], Awaitable[None]]


class _TooLarge(HTTPException):
    """Raised while the app reads the body; FastAPI passes HTTPExceptions on to the JSON error handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


async def _send_json(send: Callable, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes, by ``Content-Length`` or while streaming."""

    def __init__(self, app: ASGI, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_body("too_large", f"request body over {self.limit} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, too_large)
        seen = 0
        started = False

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        async def tracking(message: dict) -> None:
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, too_large)


class AccessLog:
    """One JSON line per request (``event: request``: method, route template, path, status, ms, bytes
    sent, client address) and, with ``metrics``, its latency and status in ``/metrics``."""

    def __init__(self, app: ASGI, metrics: Any = None) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status, sent = [0], [0]

        async def recording(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            seconds = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # the template: bounded labels
            client = scope.get("client")
            log.info("request", extra={"event": "request", "method": scope.get("method"), "route": route,
                                       "path": scope.get("path"), "status": status[0] or 500,
                                       "ms": round(1000 * seconds, 2), "bytes": sent[0],
                                       "client": client[0] if client else None})
            if self.metrics is not None:
                self.metrics.observe_request(scope.get("method") or "", route, status[0] or 500, seconds)
