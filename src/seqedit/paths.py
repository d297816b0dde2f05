"""Where seqedit keeps its caches (converted models, Σ₀ statistics, context templates), and the
inter-process lock that makes each cache entry be built once."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import platformdirs
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)
T = TypeVar("T")


def cache_dir(*parts: str) -> Path:
    """``$SEQEDIT_CACHE`` (or the user cache dir) joined with ``parts``, created if missing."""
    root = Path(os.environ.get("SEQEDIT_CACHE") or platformdirs.user_cache_dir("seqedit"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold the inter-process lock for building the cache entry ``target`` (a file or a directory).

    Processes that miss the same entry at once (pytest-xdist workers, several service workers on a
    cold cache) then build it once: the others wait here and, holding the lock, must look for the
    entry again before building. Writes stay atomic on their own; the lock only saves duplicate work.
    The lock file ``.<name>.lock`` beside ``target`` is left in place: removing it would race a waiter.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target.parent / f".{target.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("seqedit: waiting for another process that is building %s", target)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_once(target: Path, read: Callable[[], T | None], build: Callable[[], T]) -> T:
    """``read()`` the cache entry ``target`` if it is there (not ``None``), else ``build()`` it under
    :func:`build_lock`, reading again first: the process we waited for may have built it."""
    found = read()
    if found is not None:
        return found
    with build_lock(target):
        found = read()
        return found if found is not None else build()
