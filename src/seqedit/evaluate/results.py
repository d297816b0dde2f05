"""The results store of an evaluation run: ``results.json`` in the output folder.

Owns the file's :data:`FORMAT`, :class:`ResultsStore` (loaded and validated if present, settings
checked, held as a typed :class:`~.schema.ResultsFile`, rewritten atomically), :func:`check_out_dir`,
and what the records are made of: the final-weights fingerprint (:func:`weights_sha`), the already
scored final models (:func:`scored_finals`), the software versions (:func:`library_versions`) and
timestamps (:func:`utc_now`). What the file holds is :mod:`seqedit.evaluate.schema`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_json
from ..models.presets import EditHParams
from .config import EvalConfig, EvalSettingsError, baseline_settings
from .schema import ConfigEntry, FinalMetrics, ResultsFile, Settings, read_results

__all__ = ["FORMAT", "ResultsStore", "baseline_differences", "check_out_dir", "library_versions", "read_measured",
           "scored_finals", "utc_now", "weights_sha"]

FORMAT = "seqedit-eval/1"


def library_versions() -> dict[str, Any]:
    import numpy
    import transformers

    from ..version import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "seqedit": __version__, "git_commit": commit, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
    }


def weights_sha(base: dict[int, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for layer in sorted(base):
        h.update(str(layer).encode())
        h.update(base[layer].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def scored_finals(configs: Mapping[str, ConfigEntry]) -> dict[str, tuple[str, FinalMetrics]]:
    """``{final_weights_sha256: (label, final metrics)}`` of the done configurations that scored their
    own final model (the first such one per sha)."""
    out: dict[str, tuple[str, FinalMetrics]] = {}
    for label, c in configs.items():
        if c.status == "done" and c.final_weights_sha256 and not c.final_reused_from and c.final is not None:
            out.setdefault(c.final_weights_sha256, (label, c.final))
    return out


def differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """The keys whose values differ, as ``"k: OLD there, NEW now; ..."`` (first ``limit``); ``""`` if none."""
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff[:limit])


def read_measured(folder: str | Path, label: str) -> ResultsFile:
    """``folder/results.json``, which must hold a pre-edit baseline; raises :class:`EvalSettingsError`
    starting with ``label`` (how the caller names the folder) when it cannot be read or has none, and
    :class:`~.schema.ResultsFileError` (an ``EvalSettingsError``) naming the key path of a malformed one."""
    path = Path(folder) / "results.json"
    try:
        data = read_results(path)
    except (OSError, json.JSONDecodeError) as e:
        raise EvalSettingsError(f"{label}: cannot read {path} ({e})") from None
    if data.baseline is None:
        raise EvalSettingsError(f"{label}: it has no baseline yet (its run stopped before the pre-edit metrics)")
    return data


def baseline_differences(theirs: ResultsFile, mine: ResultsFile) -> str:
    """``""`` when two runs measure their pre-edit baseline alike, else what differs, in words.

    ``mine`` may be a run about to start, holding only its ``model`` (name and base-weight
    ``cache_key``), ``settings`` and ``selection`` (``fact_ids``). Alike means the same model, the same
    facts and the same metrics (:func:`~.config.baseline_settings`); how the facts are edited may differ.
    """
    def model(r: ResultsFile) -> dict[str, Any]:
        return {"name": r.model.name if r.model else None, "cache_key": r.model.cache_key if r.model else None}

    def settings(r: ResultsFile) -> dict[str, Any]:
        return baseline_settings(r.settings.to_dict() if r.settings else {})

    def fact_ids(r: ResultsFile) -> tuple[str, ...] | None:
        return r.selection.fact_ids if r.selection else None

    if (a := model(theirs)) != (b := model(mine)):
        return f"another model ({a} vs {b})"
    if shown := differences(settings(theirs), settings(mine)):
        return f"its baseline was measured differently ({shown})"
    if fact_ids(theirs) != fact_ids(mine):
        return "other facts were selected"
    return ""


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _respelt(before: dict[str, Any], now: dict[str, Any], hparams: Mapping[str, Any] | None) -> bool:
    """Whether overrides ``now`` may differ from ``before`` only in spelling: every value given anew is
    the one the folder's recorded ``hparams`` already hold (a dropped override is left to the runner)."""
    if hparams is None:
        return False
    try:  # with the fields a stored dict leaves out at the values it implies (EditHParams.to_dict)
        held = dataclasses.asdict(EditHParams.from_dict(hparams)) | {"layers": list(hparams.get("layers", []))}
    except (TypeError, ValueError):
        return False
    return all(before.get(k) == v or held.get(k) == v for k, v in now.items())


class ResultsStore:
    """``results.json`` under ``folder``: loaded if present (validated; settings must match), held as
    :attr:`results` (a :class:`~.schema.ResultsFile` the run replaces piece by piece) and rewritten
    atomically by :meth:`write`."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        self.path = folder / "results.json"
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text("utf-8"))
            except json.JSONDecodeError as e:
                raise EvalSettingsError(f"{self.path} is not valid JSON ({e}); move it away to start afresh") from None
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise EvalSettingsError(f"{self.path} is not a {FORMAT} results file; use another output folder")
            self.results = ResultsFile.from_dict(data, source=self.path)
            before = self.results.settings.to_dict() if self.results.settings else {}
            if _respelt(before.get("overrides", {}), settings.get("overrides", {}), self.results.hparams):
                # the overrides only spell how the folder's hyperparameters were reached: after a preset
                # changes, its old values are passed as overrides to continue it (the runner then compares
                # the resolved hyperparameters exactly, once the preset is known)
                before = {k: v for k, v in before.items() if k != "overrides"}
                settings = {k: v for k, v in settings.items() if k != "overrides"}
            shown = differences(before, settings)
            if shown:
                raise EvalSettingsError(
                    f"{folder} holds results of other settings ({shown}); use another --out folder "
                    "(results of different settings are never mixed)"
                )
        else:
            self.results = ResultsFile(format=FORMAT, settings=Settings.from_dict(settings, at="settings"))

    def update(self, **fields: Any) -> None:
        """Replace these top-level fields of :attr:`results` (written at the next :meth:`write`)."""
        self.results = dataclasses.replace(self.results, **fields)

    def set_config(self, label: str, entry: ConfigEntry) -> None:
        """Put configuration ``label``'s entry (in its place if it has one, else last)."""
        self.update(configs={**self.results.configs, label: entry})

    def write(self) -> None:
        atomic_write_json(self.path, self.results.to_dict())


def check_out_dir(config: EvalConfig, out_dir: str | Path) -> None:
    """Raise :class:`EvalSettingsError` if ``config`` is invalid or ``out_dir`` holds other settings' results."""
    config.validate()
    ResultsStore(Path(out_dir), config.settings())
