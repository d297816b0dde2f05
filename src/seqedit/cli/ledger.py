"""Ledger commands of the ``seqedit`` CLI: forget, undo, rekey, refresh, log, verify, constraint-fit, export
(``docs/ledger.md``).

Each takes ``--ledger DIR``; those that need the model load the ledger's base model (its recorded
name) unless ``--model`` says otherwise, and every one has ``--json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import (EXIT_CHECK_FAILED, BaseOpt, DeviceMapOpt, DtypeOpt, JsonOpt, LedgerOpt, app, console, fail, out,
                     progress_bars)
from .preflight import check_new_dir

if TYPE_CHECKING:
    from ..editor import Editor
    from ..ledger import Ledger, StepRecord, VerifyReport
    from ..ledger.fit import FitReport


@contextmanager
def reopened(ledger: Path, model: Optional[str], check: Callable[[Ledger], None] | None = None,
             dtype: Optional[str] = None, device_map: Optional[str] = None) -> Iterator[Editor]:
    """The ledger reopened on a freshly loaded base model (``Editor.from_ledger``: its recorded name and
    dtype unless given). Before the model loads, the ledger is read (read-only), its writer lock must
    be free, and ``check`` may refuse the request on it."""
    from ..editor import Editor
    from ..errors import SeqEditError
    from ..ledger import Ledger
    from ..ledger.directory import check_writable
    from ..models.load import model_config, parse_device_map

    from transformers.utils import logging as hf_logging

    with Ledger(ledger) as L:
        name = model or L.manifest["base"]["name"]
        if check is not None:
            check(L)
    check_writable(ledger)
    model_config(name)  # a bad --model fails here, not after a load
    hf_logging.disable_progress_bar()  # the spinner says it; tqdm bars would garble Rich's output
    try:
        with console.status("loading the base model and restoring the ledger's weights …"):
            editor = Editor.from_ledger(ledger, model=name, dtype=dtype, device_map=parse_device_map(device_map))
    except (SeqEditError, ValueError, OSError) as e:
        fail(str(e))
    try:
        yield editor
    finally:
        editor.close()


def _step(ledger: Path, model: Optional[str], as_json: bool, what: str, act: Callable[[Editor], StepRecord],
          check: Callable[[Ledger], None], dtype: Optional[str] = None, device_map: Optional[str] = None) -> None:
    """Run ``act`` (a forget or an undo) on the reopened ledger and print its step record, as JSON
    or as one line saying what it did."""
    with reopened(ledger, model, check, dtype, device_map) as editor:
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
    from ..ledger.plan import plan_forget
    from ..methods import MethodSpec

    def check(L: Ledger) -> None:  # the same plan the editor makes, refused before the model loads
        plan_forget(ids, L.in_force_with_ids(ids), MethodSpec.from_dict(L.manifest["method"]))

    _step(ledger, model, as_json, "forget", lambda editor: editor.forget(ids), check, dtype, device_map)


@app.command()
def undo(
    step: int = typer.Argument(..., min=1, help="The step to revert (see `seqedit log`)."),
    ledger: Path = LedgerOpt,
    model: Optional[str] = BaseOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Revert a step: its facts leave, the facts it replaced or forgot come back (undo an undo to redo)."""
    from ..ledger.plan import plan_undo_step
    from ..methods import MethodSpec

    def check(L: Ledger) -> None:
        plan_undo_step(L, step, MethodSpec.from_dict(L.manifest["method"]))

    _step(ledger, model, as_json, f"undo of step {step}", lambda editor: editor.undo(step), check, dtype, device_map)


@app.command()
def rekey(
    ledger: Path = LedgerOpt,
    model: Optional[str] = BaseOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Re-read every fact's keys on the current model and re-solve from the base weights: the one-time
    edit of the facts in force, as a one-time editor reads their keys (undo it like any step)."""
    from ..ledger.columns import targets
    from ..methods import MethodSpec
    from ..rekey import check_exact

    def check(L: Ledger) -> None:
        check_exact(MethodSpec.from_dict(L.manifest["method"]))
        rows = L.in_force()
        if not rows:
            fail(f"ledger {ledger} has no facts in force to rekey")
        targets(L, rows)

    with reopened(ledger, model, check, dtype, device_map) as editor:
        rec = editor.rekey()
    if as_json:
        out.print_json(data=rec.to_dict())
        return
    sec = rec.info.get("seconds", {})
    out.print(f"step {rec.id} (rekey): {len(rec.added)} facts re-read and re-solved in {sum(sec.values()):.1f} s; "
              f"residual left {rec.info['final_residual']:.3g} of {rec.info['target_norm']:.3g}")


@app.command()
def refresh(
    ledger: Path = LedgerOpt,
    model: Optional[str] = BaseOpt,
    max_facts: Optional[int] = typer.Option(None, "--max-facts", min=0, help="Re-edit at most this many faded facts."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", min=0,
        help="Start no step that would end past this many seconds (the last step's time is the estimate)."),
    batch_size: int = typer.Option(100, "--batch-size", min=1, help="Faded facts re-edited per ledger step."),
    criterion: str = typer.Option("most_probable", "--criterion",
        help="When a fact wins: most_probable (its target is the argmax at every target token) | vs_true "
             "(its target is more likely than its true answer)."),
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Re-edit the facts in force that no longer win on the current model, oldest first, replacing their
    constraints exactly; budgeted and resumable (each step is committed; run it again to go on)."""
    from ..methods import MethodSpec
    from ..refresh import CRITERIA, refresh as run_refresh

    if criterion not in CRITERIA:
        fail(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")

    def check(L: Ledger) -> None:
        if MethodSpec.from_dict(L.manifest["method"]).capabilities.removal == "none":
            fail(f"ledger {ledger} uses {L.manifest['method_label']}, which cannot replace a fact's constraint "
                 "exactly; refresh needs an exact form")
        if not L.in_force():
            fail(f"ledger {ledger} has no facts in force to refresh")

    with reopened(ledger, model, check, dtype, device_map) as editor, progress_bars(not as_json) as cb:
        rep = run_refresh(editor, max_facts=max_facts, max_seconds=max_seconds, batch_size=batch_size,
                          criterion=criterion, progress=cb)
    if as_json:
        out.print_json(data=rep.to_dict())
        return
    left = "" if rep.still_faded is None else f"; {rep.still_faded} of them still fade"
    out.print(f"{rep.faded} of {rep.in_force} facts in force had faded; re-edited {len(rep.refreshed)} in "
              f"{len(rep.steps)} steps ({rep.stopped}, {rep.seconds['total']:.1f} s){left}")


@app.command()
def log(
    ledger: Path = LedgerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """The ledger's steps and the facts in force (no model needed)."""
    from ..ledger import Ledger

    from ..ledger.columns import first_added

    with Ledger(ledger) as L:  # read-only: writes nothing, not even SQLite's shared-memory file
        man, steps, rows = L.manifest, L.steps(), L.in_force()
        first = [first_added(L, r) for r in rows]
    if as_json:  # plain json.dumps: Rich's highlighting of a long history took 95 % of the command's time
        out.file.write(json.dumps({
            "ledger": str(ledger), "manifest": man, "steps": [s.to_dict() for s in steps],
            "in_force": [{"added": r.added, "first_added": a, **r.fact.to_dict()} for r, a in zip(rows, first)],
        }, indent=2, ensure_ascii=False) + "\n")
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
    for col in ("id", "subject", "prompt", "target", "edited at step"):
        f.add_column(col)
    for r, a in zip(rows, first):  # a rekey re-adds every fact: the step that first edited it is shown
        f.add_row(str(r.fact.id), r.fact.subject, r.fact.prompt, r.fact.target,
                  str(a) if a == r.added else f"{a} (rekeyed at {r.added})")
    out.print(f)


@app.command()
def verify(
    ledger: Path = LedgerOpt,
    model: Optional[str] = BaseOpt,
    tol: float = typer.Option(1e-8, min=0.0, help="Largest relative error accepted per layer."),
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Check every file (checksums, the journal's pages and content digest), then re-solve the one-time
    problem of the facts in force and compare with the restored weights per layer. Lists every problem
    found; exits with 1 when anything fails (2: not a ledger, or a bad option)."""
    from ..ledger import Ledger, LedgerCorruptError
    from ..ledger.verify import check_files, unreadable

    if not Ledger.exists(ledger):
        fail(f"{ledger} is not a seqedit ledger (no ledger.sqlite)")
    try:
        with Ledger(ledger) as L:
            rep = check_files(L, tol)
    except LedgerCorruptError as e:
        rep = unreadable(ledger, str(e), tol)
    if rep.ok:  # the files are sound: now the weights (this loads the model)
        try:
            with reopened(ledger, model, dtype=dtype, device_map=device_map) as editor:
                rep = editor.verify(tol)
        except LedgerCorruptError as e:
            rep.ok, rep.bad_files = False, [("ledger", str(e))]
    _print_verify(ledger, rep, as_json)
    if not rep.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("constraint-fit")
def constraint_fit(
    ledger: Path = LedgerOpt,
    model: Optional[str] = BaseOpt,
    groups: int = typer.Option(10, min=1, help="Group the writing steps into at most this many rows."),
    at_step: Optional[list[int]] = typer.Option(None, "--at-step", min=1, help="Measure the facts in force after "
                                                "this step, under the weights of that moment (exact methods; repeatable)."),
    key_drift: bool = typer.Option(False, "--key-drift", help="Re-read the facts' keys on the restored model and "
                                   "report how far they moved from the stored ones, and the fit with the keys read now."),
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    as_json: bool = JsonOpt,
) -> None:
    """How much of each stored constraint of the facts in force the restored weights leave undone
    (‖W k − v‖ / ‖v − W₀ k‖: 0 met, 1 not at all), per layer and by the steps that wrote the facts; with
    the key columns in force against the layer's key dimension. A share that grows evenly across ages
    says the layer is full; one that grows with age says early edits fade."""
    from ..ledger import Ledger, LedgerError

    if not Ledger.exists(ledger):
        fail(f"{ledger} is not a seqedit ledger (no ledger.sqlite)")
    if key_drift and at_step:
        fail("--key-drift reads the keys on the restored (latest) model; it does not combine with --at-step")

    def check(L: Ledger) -> None:  # before the model loads
        if bad := [s for s in at_step or [] if s > L.last_step]:
            raise LedgerError(f"ledger {ledger} has steps 1..{L.last_step}; no step {bad[0]} to measure the fit after")

    with reopened(ledger, model, check, dtype=dtype, device_map=device_map) as editor:
        try:
            reps = ([editor.key_drift(groups)] if key_drift
                    else [editor.constraint_fit(groups, s) for s in (at_step or [None])])
        except LedgerError as e:
            fail(str(e))
    if as_json:  # one report per measured moment, in the order asked (the last step when none is)
        out.print_json(data=[r.to_dict() for r in reps])
        return
    for rep in reps:
        (_print_drift if key_drift else _print_fit)(ledger, rep)


def _by_step_table(title: str, rep: FitReport, cell) -> Table:
    """One row per group of writing steps and one for all facts, one column per layer; ``cell(entry)``
    formats a layer's entry (a group or the whole layer)."""
    first = next(iter(rep.layers.values()))
    t = Table(title=title)
    t.add_column("steps")
    t.add_column("facts", justify="right")
    for l in rep.layers:
        t.add_column(f"layer {l}", justify="right")
    for i, g in enumerate(first["by_step"]):
        t.add_row(f"{g['steps'][0]}–{g['steps'][1]}", str(g["facts"]), *(cell(e["by_step"][i]) for e in rep.layers.values()))
    t.add_row("all", str(rep.n_facts), *(cell(e) for e in rep.layers.values()), style="bold")
    return t


def _print_drift(ledger: Path, rep: FitReport) -> None:
    if not rep.layers:
        out.print(f"key drift {ledger}: no facts in force")
        return
    out.print(_by_step_table(
        f"key drift {ledger}: median ‖k_now − k‖/‖k‖ of the facts in force after step {rep.steps}, and the median "
        f"unmet share with the keys read now (stored keys), by writing step ({rep.n_facts} facts)", rep,
        lambda g: f"{g['median']:.3f} · {g['unmet_now']:.3f} ({g['unmet_stored']:.3f})"))


def _print_fit(ledger: Path, rep: FitReport) -> None:
    if not rep.layers:
        out.print(f"fit {ledger}: no facts in force")
        return
    t = _by_step_table(f"fit {ledger}: median unmet share of the constraints in force after step {rep.steps}, "
                       f"by the steps that wrote them ({rep.n_facts} facts)", rep, lambda g: f"{g['median']:.3f}")
    t.add_row("keys/d_in", "", *(f"{e['columns']}/{e['d_in']}" for e in rep.layers.values()))
    out.print(t)


def _print_verify(ledger: Path, rep: VerifyReport, as_json: bool) -> None:
    if as_json:
        out.print_json(data=rep.to_dict())
        return
    if rep.layers:
        t = Table(title=f"verify {ledger}: {rep.method}, {rep.n_facts} facts in force after {rep.steps} steps")
        for col in ("layer", "relative error", "deployed = master"):
            t.add_column(col, justify="right")
        for l, e in rep.layers.items():
            rel = "n/a (not a one-time solution)" if e["rel_error"] is None else f"{e['rel_error']:.2e}"
            t.add_row(str(l), rel, "yes" if e["deployed_matches"] else "[red]NO[/]")
        out.print(t)
    else:
        out.print(f"verify {ledger}: weights not checked (the files must be sound first)")
    out.print(f"{rep.files_checked} files checked, {len(rep.bad_files)} bad")
    if problems := rep.problems():
        t = Table(title=f"{len(problems)} problems")
        t.add_column("what")
        t.add_column("problem")
        for what, problem in problems:
            t.add_row(escape(what), f"[red]{escape(problem)}[/]")
        out.print(t)
    out.print("[bold green]OK[/]" if rep.ok else f"[bold red]FAILED[/] (tolerance {rep.tol:g})")


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
    if delta_dtype not in ("float32", "float64"):
        fail(f"--delta-dtype must be float32 or float64, got {delta_dtype!r}")
    check_new_dir(dest, "export target")
    with reopened(ledger, model, dtype=dtype, device_map=device_map) as editor:
        path = editor.export(dest, delta=delta, delta_dtype=delta_dtype)
        step = editor.ledger.last_step
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if as_json:
        out.print_json(data={"path": str(path), "delta": delta, "bytes": size, "step": step})
        return
    kind = "weight deltas + apply_delta.py" if delta else "HF model"
    out.print(f"{kind} of ledger step {step} written to {path} ({size / 1e6:.1f} MB)")
