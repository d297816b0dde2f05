"""A readers–writer lock for the model's weights: completions read, ledger steps write.

A step (apply, forget, undo) holds the write side for its whole duration, so a completion runs wholly
before or wholly after it and never sees some layers updated and others not. Writers are preferred:
a steady stream of completions cannot starve the edit worker.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["WeightsLock"]


class WeightsLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def writer_waiting(self) -> bool:
        """Whether a writer waits for the lock (a reader that holds it should let go soon)."""
        with self._cond:
            return self._writers_waiting > 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
