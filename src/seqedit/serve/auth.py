"""Bearer-token auth with a read and a write scope (a write token may also read).

Tokens are compared with :func:`hmac.compare_digest` against every configured token (no early exit),
so the time taken does not tell how much of a guess was right. With no token configured the API is
open; :class:`~seqedit.serve.config.ServeConfig` allows that on loopback addresses only.
"""

from __future__ import annotations

import hmac
from typing import Callable

from fastapi import Request

from .config import TokenTable
from .errors import ApiError

__all__ = ["require", "scope_of"]


def _matches(token: bytes, candidates: tuple[str, ...]) -> bool:
    hit = False
    for c in candidates:
        hit |= hmac.compare_digest(token, c.encode("utf-8"))
    return hit


def scope_of(table: TokenTable, authorization: str | None) -> str | None:
    """``"write"``, ``"read"`` or ``None`` for the ``Authorization`` header value."""
    if not table.enabled:
        return "write"
    if not authorization:
        return None
    kind, _, token = authorization.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return None
    raw = token.strip().encode("utf-8", "surrogateescape")
    if _matches(raw, table.write):
        return "write"
    if _matches(raw, table.read):
        return "read"
    return None


def require(scope: str) -> Callable[[Request], None]:
    """A FastAPI dependency refusing requests whose token lacks ``scope`` (401 none or unknown, 403 read-only)."""

    def check(request: Request) -> None:
        got = scope_of(request.app.state.config.tokens, request.headers.get("authorization"))
        if got is None:
            raise ApiError(401, "unauthorized", "missing or unknown bearer token", {"WWW-Authenticate": "Bearer"})
        if scope == "write" and got != "write":
            raise ApiError(403, "forbidden", "this token may only read")

    return check
