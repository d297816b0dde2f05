"""Several evaluation folders as one: aligned and naive, or two presets, measured on the same baseline.

A long run's configurations are often evaluated into separate folders (one session each, the later
ones adopting the first one's baseline with ``--baseline-from``). :func:`merge_results` joins such
folders into one results dict that :func:`seqedit.report.render_data` turns into a single report and
one set of curves, after checking that every folder measured its pre-edit baseline alike (same model
and base weights, facts and metrics: :func:`~.results.baseline_differences`); folders that did not
would put numbers side by side that do not compare, and are refused by name.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

from .config import EvalSettingsError
from .results import baseline_differences, read_measured

__all__ = ["merge_results"]


def _relabel(label: str, tag: str) -> str:
    method, rest = label.split("/", 1)
    return f"{method} ({tag})/{rest}"


def _hparams_vs(first: dict[str, Any], other: dict[str, Any]) -> dict[str, list[Any]]:
    """``{name: [value in the first folder, value here]}`` for the hyperparameters that differ."""
    return {k: [first.get(k), other.get(k)] for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k)}


def merge_results(folders: Sequence[str | Path]) -> dict[str, Any]:
    """One results dict holding the configurations of every folder in ``folders`` (at least two).

    The first folder gives the baseline, settings and protocol; each configuration keeps its label
    (``method/alignment/mode``) unless two folders hold the same one, in which case the method part
    of every copy is tagged with its folder's name (``memit (both)/aligned/se``). ``sources`` lists,
    per folder, its configurations, values protocol, prompt format, preset and the hyperparameters
    that differ from the first folder's. Raises :class:`EvalSettingsError` naming the folder whose
    baseline was measured otherwise, or whose tags would still collide.
    """
    paths = [Path(f) for f in folders]
    if len(paths) < 2:
        raise EvalSettingsError("a comparison needs at least two results folders")
    datas = [read_measured(p, str(p)) for p in paths]
    first = datas[0]
    for path, data in zip(paths[1:], datas[1:]):
        if shown := baseline_differences(data, first):
            raise EvalSettingsError(f"{path} does not compare with {paths[0]}: {shown}")
    counts: dict[str, int] = {}
    for data in datas:
        for label in data.get("configs", {}):
            counts[label] = counts.get(label, 0) + 1
    tags = [p.name or str(p) for p in paths]
    if len(set(tags)) < len(tags) and any(c > 1 for c in counts.values()):
        raise EvalSettingsError(f"folders {', '.join(map(str, paths))} hold the same configurations and their names "
                                "do not tell them apart; give them distinct folder names")
    merged = copy.deepcopy(first)
    merged.update(configs={}, planned=[], skipped=[], sources=[])
    for path, tag, data in zip(paths, tags, datas):
        names = {label: _relabel(label, tag) if counts[label] > 1 else label for label in data.get("configs", {})}
        for label, entry in data.get("configs", {}).items():
            entry = copy.deepcopy(entry)
            if entry.get("same_as") in names:  # a reused configuration points at its folder's copy
                entry["same_as"] = names[entry["same_as"]]
            merged["configs"][names[label]] = entry
        merged["planned"] += [names.get(label, label) for label in data.get("planned", [])]
        merged["skipped"] += [{**s, "config": f"{s['config']} ({tag})"} for s in data.get("skipped", [])]
        settings = data.get("settings", {})
        merged["sources"].append({
            "folder": str(path), "configs": list(names.values()),
            "values": data.get("protocol", {}).get("values"),
            "prompt_format": settings.get("prompt_format", "bare"), "preset": settings.get("preset"),
            "batch_size": settings.get("batch_size"), "commit": data.get("versions", {}).get("git_commit"),
            "hparams_vs_first": _hparams_vs(first.get("hparams", {}), data.get("hparams", {})),
        })
    if len({s["values"] for s in merged["sources"]}) > 1:
        merged["protocol"] = {**merged.get("protocol", {}), "values": "mixed",
                              "values_description": "differs between the folders (see Sources)"}
    return merged
