"""Ledger commands of the ``seqedit`` CLI: forget, undo, log, verify, export (``docs/ledger.md``).

Each takes ``--ledger DIR``; those that need the model load the ledger's base model (its recorded
name) unless ``--model`` says otherwise, and every one has ``--json``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from .common import BaseOpt, DeviceMapOpt, DtypeOpt, JsonOpt, LedgerOpt, app, console, fail, out

if TYPE_CHECKING:
    from ..editor import Editor
    from ..ledger import StepRecord


@contextmanager
def _editor(ledger: Path, model: Optional[str], dtype: Optional[str] = None,
            device_map: Optional[str] = None) -> Iterator[Editor]:
    """The ledger reopened on a freshly loaded base model (its recorded name and dtype unless given);
    SeqEditErrors become CLI errors."""
    from ..editor import Editor
    from ..errors import SeqEditError
    from ..models.load import parse_device_map

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the spinner says it; tqdm bars would garble Rich's output
    try:
        with console.status("loading the base model and restoring the ledger's weights …"):
            editor = Editor.from_ledger(ledger, model=model, dtype=dtype, device_map=parse_device_map(device_map))
    except (SeqEditError, ValueError, OSError) as e:
        fail(str(e))
    try:
        yield editor
    except (SeqEditError, ValueError, OSError) as e:
        fail(str(e))
    finally:
        editor.close()


def _step(ledger: Path, model: Optional[str], as_json: bool, what: str, act: Callable[[Editor], StepRecord],
          dtype: Optional[str] = None, device_map: Optional[str] = None) -> None:
    """Run ``act`` (a forget or an undo) on the reopened ledger and print its step record, as JSON
    or as one line saying what it did."""
    with _editor(ledger, model, dtype, device_map) as editor:
        rec = act(editor)
    if as_json:
        out.print_json(data=rec.to_dict())
        return
    out.print(f"step {rec.id} ({what}): {len(rec.added)} facts back in force, {len(rec.removed)} removed")


@app.command()
def forget(
    ids: list[str] = typer.Argument(..., help="Ids of the facts in force to remove."),
    ledger: Path = LedgerOpt,
    model: Optional[str] = BaseOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Remove facts exactly: the weights become the one-time solution of the remaining facts."""
    _step(ledger, model, as_json, "forget", lambda editor: editor.forget(ids), dtype, device_map)


@app.command()
def undo(
    step: int = typer.Argument(..., help="The step to revert (see `seqedit log`)."),
    ledger: Path = LedgerOpt,
    model: Optional[str] = BaseOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Revert a step: its facts leave, the facts it replaced or forgot come back (undo an undo to redo)."""
    _step(ledger, model, as_json, f"undo of step {step}", lambda editor: editor.undo(step), dtype, device_map)


@app.command()
def log(
    ledger: Path = LedgerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """The ledger's steps and the facts in force (no model needed)."""
    from ..errors import SeqEditError
    from ..ledger import Ledger

    try:
        with Ledger(ledger) as L:
            man, steps, rows = L.manifest, L.steps(), L.in_force()
    except SeqEditError as e:
        fail(str(e))
    if as_json:
        out.print_json(data={
            "ledger": str(ledger), "manifest": man, "steps": [s.to_dict() for s in steps],
            "in_force": [{"added": r.added, **r.fact.to_dict()} for r in rows],
        })
        return
    t = Table(title=f"ledger {ledger}: {man['base']['name']}, {man['method_label']}, {len(steps)} steps")
    for col in ("step", "kind", "when", "+facts", "−facts", "note"):
        t.add_column(col, justify="right" if col in ("step", "+facts", "−facts") else "left")
    for s in steps:
        note = f"undoes step {s.target}" if s.target else ""
        if s.undone_by:
            note = (note + "; " if note else "") + f"undone by step {s.undone_by}"
        when = datetime.fromtimestamp(s.created).strftime("%Y-%m-%d %H:%M:%S")
        t.add_row(str(s.id), s.kind, when, str(len(s.added)), str(len(s.removed)), note)
    out.print(t)
    f = Table(title=f"{len(rows)} facts in force")
    for col in ("id", "subject", "prompt", "target", "step"):
        f.add_column(col)
    for r in rows:
        f.add_row(str(r.fact.id), r.fact.subject, r.fact.prompt, r.fact.target, str(r.added))
    out.print(f)


@app.command()
def verify(
    ledger: Path = LedgerOpt,
    model: Optional[str] = BaseOpt,
    tol: float = typer.Option(1e-8, help="Largest relative error accepted per layer."),
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Re-solve the one-time problem of the facts in force, compare with the restored weights per layer,
    and check every file's checksum. Exits with 1 when anything fails."""
    with _editor(ledger, model, dtype, device_map) as editor:
        rep = editor.verify(tol)
    if as_json:
        out.print_json(data=rep.to_dict())
    else:
        t = Table(title=f"verify {ledger}: {rep.method}, {rep.n_facts} facts in force after {rep.steps} steps")
        for col in ("layer", "relative error", "deployed = master"):
            t.add_column(col, justify="right")
        for l, e in rep.layers.items():
            rel = "n/a (not a one-time solution)" if e["rel_error"] is None else f"{e['rel_error']:.2e}"
            t.add_row(str(l), rel, "yes" if e["deployed_matches"] else "[red]NO[/]")
        out.print(t)
        out.print(f"{rep.files_checked} files checked, {len(rep.bad_files)} bad" +
                  "".join(f"\n  [red]{n}: {p}[/]" for n, p in rep.bad_files))
        out.print("[bold green]OK[/]" if rep.ok else f"[bold red]FAILED[/] (tolerance {rep.tol:g})")
    if not rep.ok:
        raise typer.Exit(1)


@app.command()
def export(
    dest: Path = typer.Argument(..., help="New directory to write."),
    ledger: Path = LedgerOpt,
    model: Optional[str] = BaseOpt,
    delta: bool = typer.Option(False, "--delta", help="Write only W − W₀ of the edited matrices + a loader."),
    delta_dtype: str = typer.Option("float32", "--delta-dtype", help="float32 | float64 (bit-exact weights)."),
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write the edited model as a plain HF directory (AutoModelForCausalLM.from_pretrained), or its deltas."""
    with _editor(ledger, model, dtype, device_map) as editor:
        path = editor.export(dest, delta=delta, delta_dtype=delta_dtype)
        step = editor.ledger.last_step
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if as_json:
        out.print_json(data={"path": str(path), "delta": delta, "bytes": size, "step": step})
        return
    kind = "weight deltas + apply_delta.py" if delta else "HF model"
    out.print(f"{kind} of ledger step {step} written to {path} ({size / 1e6:.1f} MB)")
