"""What the report reads from ``results.json``: the metrics per dataset, their short names, the
configurations by method and alignment, and the path lookups the tables and plots share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["EDIT_METRICS", "SHORT_NAMES", "cohort_points", "config_rows", "get_path", "load_results"]

EDIT_METRICS = {
    "counterfact": ("efficacy", "generalization", "specificity"),
    "zsre": ("efficacy", "generalization", "specificity_vs_pre_edit", "specificity_vs_gold"),
}
SHORT_NAMES = {"efficacy": "Eff.", "generalization": "Gen.", "specificity": "Spe.", "specificity_vs_pre_edit":
          "Spe. (vs pre-edit)", "specificity_vs_gold": "Spe. (vs gold)", "fluency": "Flu.", "consistency": "Consis."}


def load_results(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {folder}")
    return json.loads(path.read_text("utf-8"))


def config_rows(data: dict[str, Any], running: bool = False) -> dict[tuple[str, str], dict[str, dict]]:
    """``{(method, alignment): {"se": entry, "ote": entry}}`` of the completed configurations, and with
    ``running`` also of those still running that have points along the run (a checkpointed run saves
    them after every step)."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for label, e in data.get("configs", {}).items():
        going = running and e.get("status") == "running" and bool(e.get("retention") or e.get("curve"))
        if e.get("status") == "done" or going:
            m, a, mode = label.split("/")
            out.setdefault((m, a), {})[mode] = e
    return out


def get_path(d: dict | None, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def cohort_points(se: dict) -> list[dict]:
    """The retention points of an SE entry that carry per-cohort means, in order of edits."""
    return sorted((p for p in se.get("retention") or [] if p.get("by_cohort")), key=lambda p: p["edits"])
