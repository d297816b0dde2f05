"""Several evaluation folders as one: aligned and naive, or two presets, measured on the same baseline.

A long run's configurations are often evaluated into separate folders (one session each, the later
ones adopting the first one's baseline with ``--baseline-from``). :func:`merge` joins such folders
into one :class:`~.schema.ResultsFile` that :func:`seqedit.report.render_data` turns into a single
report and one set of curves, after checking that every folder measured its pre-edit baseline alike
(same model and base weights, facts and metrics: :func:`~.results.baseline_differences`); folders
that did not would put numbers side by side that do not compare, and are refused by name.
:func:`merge_results` is the same as a results.json dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import EvalSettingsError
from .results import baseline_differences, read_measured
from .schema import ConfigEntry, CurvePoint, EditMetrics, Protocol, ResultsFile, RetentionPoint, Settings, Source

__all__ = ["merge", "merge_results"]


def _relabel(label: str, tag: str) -> str:
    method, rest = label.split("/", 1)
    return f"{method} ({tag})/{rest}"


def _hparams_vs(first: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{name: [value in the first folder, value here]}`` for the hyperparameters that differ."""
    return {k: [first.get(k), other.get(k)] for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k)}


def _run_identity(data: ResultsFile) -> tuple[Any, ...]:
    """What must be equal for two folders' copies of a configuration to be points of one run."""
    st = data.settings or Settings()
    return (dict(data.hparams or {}), data.protocol.values if data.protocol else None,
            st.batch_size, st.prompt_format, st.preset, st.n)


def _join(entries: list[tuple[Path, ConfigEntry]], label: str, n: int) -> ConfigEntry:
    """One entry whose ``curve`` and ``retention`` points come from every copy and whose final (and
    step records) from the copy that has one; the final model's edit metrics are the retention point
    at ``n`` edits when no copy scored one there. Refuses two finals or two points at one edit count:
    the copies are then rival measurements, not parts of one run."""
    finals = [(p, e) for p, e in entries if e.final is not None]
    if len(finals) > 1:
        raise EvalSettingsError(f"cannot join {label}: {finals[0][0]} and {finals[1][0]} both hold its final model")
    base = finals[0][1] if finals else entries[-1][1]
    joined: dict[str, list[Any]] = {}
    for key in ("curve", "retention"):
        points: dict[int, tuple[Path, RetentionPoint | CurvePoint]] = {}
        for path, e in entries:
            own: list[RetentionPoint | CurvePoint] = list(e.curve if key == "curve" else e.retention)
            if key == "retention" and e.final is not None and all(p.edits != n for p in own):
                own.append(RetentionPoint.of(e.final.edit or EditMetrics(), edits=n))
            for point in own:
                if point.edits in points:
                    raise EvalSettingsError(f"cannot join {label}: {points[point.edits][0]} and {path} both "
                                            f"measured it at {point.edits} edits")
                points[point.edits] = (path, point)
        joined[key] = [points[edits][1] for edits in sorted(points)]
    return replace(base, curve=tuple(joined["curve"]), retention=tuple(joined["retention"]),
                   joined_from=tuple(str(p) for p, _ in entries))


def merge(folders: Sequence[str | Path], join: bool = False) -> ResultsFile:
    """One results file holding the configurations of every folder in ``folders`` (at least two).

    The first folder gives the baseline, settings and protocol; each configuration keeps its label
    (``method/alignment/mode``) unless two folders hold the same one, in which case the method part
    of every copy is tagged with its folder's name (``memit (both)/aligned/se``). With ``join`` such
    copies are instead one run measured in parts (a long run stopped and run again to its end): they
    must have the same hyperparameters, values protocol, batch size, prompt format, preset and n, and
    become one entry whose points along the run come from every copy (:func:`_join`). ``sources``
    lists, per folder, its configurations, values protocol, prompt format, preset and the
    hyperparameters that differ from the first folder's. Raises :class:`EvalSettingsError` naming the
    folder whose baseline was measured otherwise, whose tags would still collide, or whose copy
    cannot be joined.
    """
    paths = [Path(f) for f in folders]
    if len(paths) < 2:
        raise EvalSettingsError("a comparison needs at least two results folders")
    datas = [read_measured(p, str(p)) for p in paths]
    first = datas[0]
    for path, data in zip(paths[1:], datas[1:]):
        if shown := baseline_differences(data, first):
            raise EvalSettingsError(f"{path} does not compare with {paths[0]}: {shown}")
    if join:
        return _merge_joined(paths, datas)
    counts: dict[str, int] = {}
    for data in datas:
        for label in data.configs:
            counts[label] = counts.get(label, 0) + 1
    tags = [p.name or str(p) for p in paths]
    if len(set(tags)) < len(tags) and any(c > 1 for c in counts.values()):
        raise EvalSettingsError(f"folders {', '.join(map(str, paths))} hold the same configurations and their names "
                                "do not tell them apart; give them distinct folder names")
    configs: dict[str, ConfigEntry] = {}
    planned: list[str] = []
    skipped = []
    sources = []
    for path, tag, data in zip(paths, tags, datas):
        names = {label: _relabel(label, tag) if counts[label] > 1 else label for label in data.configs}
        for label, entry in data.configs.items():
            if entry.same_as in names:  # a reused configuration points at its folder's copy
                entry = replace(entry, same_as=names[entry.same_as])
            configs[names[label]] = entry
        planned += [names.get(label, label) for label in data.planned]
        skipped += [replace(s, config=f"{s.config} ({tag})") for s in data.skipped]
        sources.append(_source(path, data, list(names.values()), first))
    return _mark_mixed(replace(first, configs=configs, planned=tuple(planned), skipped=tuple(skipped),
                               sources=tuple(sources)))


def merge_results(folders: Sequence[str | Path], join: bool = False) -> dict[str, Any]:
    """:func:`merge` as a results.json dict (``ResultsFile.to_dict()``)."""
    return merge(folders, join).to_dict()


def _source(path: Path, data: ResultsFile, configs: list[str], first: ResultsFile) -> Source:
    """The ``sources`` record of one folder: its configurations and how it ran them."""
    st = data.settings or Settings()
    return Source(
        folder=str(path), configs=tuple(configs), values=data.protocol.values if data.protocol else None,
        prompt_format="bare" if st.prompt_format is None else st.prompt_format, preset=st.preset,
        batch_size=st.batch_size, commit=data.versions.git_commit if data.versions else None,
        hparams_vs_first=_hparams_vs(first.hparams or {}, data.hparams or {}),
    )


def _mark_mixed(merged: ResultsFile) -> ResultsFile:
    if len({s.values for s in merged.sources or ()}) > 1:
        merged = replace(merged, protocol=replace(merged.protocol or Protocol(), values="mixed",
                                                  values_description="differs between the folders (see Sources)"))
    return merged


def _merge_joined(paths: list[Path], datas: list[ResultsFile]) -> ResultsFile:
    copies: dict[str, list[tuple[Path, ConfigEntry]]] = {}
    identity: dict[str, tuple[Path, tuple[Any, ...]]] = {}
    for path, data in zip(paths, datas):
        for label, entry in data.configs.items():
            seen = identity.setdefault(label, (path, _run_identity(data)))
            if seen[1] != _run_identity(data):
                raise EvalSettingsError(f"cannot join {label}: {path} ran it otherwise than {seen[0]} "
                                        "(hyperparameters, values protocol, batch size, prompt format, preset or n)")
            copies.setdefault(label, []).append((path, entry))
    first = datas[0]
    n = (first.settings or Settings()).n or 0  # the same in every folder (_run_identity)
    configs = {}
    for label, entries in copies.items():
        if len(entries) > 1 and any(e.same_as for _, e in entries):
            raise EvalSettingsError(f"cannot join {label}: a copy reuses another configuration's result")
        configs[label] = _join(entries, label, n) if len(entries) > 1 else entries[0][1]
    sources = tuple(_source(p, d, list(d.configs), first) for p, d in zip(paths, datas))
    return _mark_mixed(replace(first, configs=configs, planned=(), skipped=(), sources=sources))
