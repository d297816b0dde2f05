"""Unit tests run on tiny random models built from configs: offline and fast. The embedded model is for
tests/integration/ only, and a unit test that reaches for it fails saying so."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_embedded_model(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("integration"):
        return
    from seqedit.models import embedded

    def refuse(*_a, **_k):
        raise AssertionError("a unit test loads the embedded model: move it to tests/integration/")

    monkeypatch.setattr(embedded, "ensure_cached_dir", refuse)
