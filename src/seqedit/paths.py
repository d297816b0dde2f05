"""Where seqedit keeps its caches (converted models, Σ₀ statistics, context templates)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    """``$SEQEDIT_CACHE`` (or the user cache dir) joined with ``parts``, created if missing."""
    root = Path(os.environ.get("SEQEDIT_CACHE") or platformdirs.user_cache_dir("seqedit"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
