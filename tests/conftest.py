"""Test set-up: one torch thread for tiny models (faster than two on tiny matrices), all threads
for integration tests on the embedded model; caches in a per-session folder unless one is given."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads((os.cpu_count() or 1) if request.node.get_closest_marker("integration") else 1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config) -> None:
    if not os.environ.get("SEQEDIT_CACHE"):
        os.environ["SEQEDIT_CACHE"] = str(config.rootpath / ".cache" / "seqedit")
