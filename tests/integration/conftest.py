"""Everything under tests/integration/ uses the embedded SmolLM2-135M model: marked ``integration``, so
that it gets the cores (tests/conftest.py) and ``-m "not integration"`` / ``tests/unit`` skip it."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in item.nodeid.replace("\\", "/") or item.path.parent.name == "integration":
            item.add_marker(pytest.mark.integration)
