"""Test set-up: one torch thread for tiny models (faster than two on tiny matrices), the cores for
integration tests on the embedded model (shared out among pytest-xdist workers, so that ``-n 2`` on
two cores does not oversubscribe them); caches in a per-session folder unless one is given."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads(request):
    before = torch.get_num_threads()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(cores if request.node.get_closest_marker("integration") else 1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config) -> None:
    if not os.environ.get("SEQEDIT_CACHE"):
        os.environ["SEQEDIT_CACHE"] = str(config.rootpath / ".cache" / "seqedit")
