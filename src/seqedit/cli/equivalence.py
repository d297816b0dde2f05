"""``seqedit verify-equivalence``: sequential vs one-time editing on the same real (K, V), for the
methods × alignments read from the method registry."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.table import Table

from .common import (
    DeviceMapOpt, DtypeOpt, JsonOpt, LamOpt, LayersOpt, ModelOpt, VStepsOpt, app, console, fail, load, out,
    parse_layers, progress_bars, read_facts,
)
from .preflight import check_edit

if TYPE_CHECKING:
    from ..methods import MethodSpec


def _specs(method: str, alignment: Optional[str], options: dict[str, Any]) -> list[MethodSpec]:
    """MethodSpecs for ``--method`` (comma list or ``all``) × ``--alignment`` (comma list, ``all``, or
    omitted = each method's default). Each form gets the given ``options`` it accepts."""
    from ..methods import METHODS, method_info, parse_method

    every = method.strip().lower() == "all"
    names = list(METHODS) if every else [m.strip() for m in method.split(",") if m.strip()]
    given = {k: v for k, v in options.items() if v is not None}
    specs = []
    try:
        for name in names:
            info = method_info(name)  # an unknown name fails here, listing the valid ones
            if alignment is None:
                aligns: list[Optional[str]] = [None]
            elif alignment.strip().lower() == "all":
                aligns = list(info.alignments)
            else:
                aligns = [a.strip() for a in alignment.split(",") if a.strip()]
                # a list applies to the methods that have those forms; a method named alone must have one
                aligns = [a for a in aligns if a in info.alignments] or ([] if every else aligns)
            for al in aligns:
                # one --ridge serves a list of methods: a form without that option (alphaedit, ...)
                # simply does not get it, rather than failing the whole run
                accepted = info.form(al or info.alignments[0]).options
                specs.append(parse_method(name, al, **{k: v for k, v in given.items() if k in accepted}))
    except ValueError as e:
        fail(str(e))
    if not specs:
        fail("--method names no method")
    return specs


@app.command("verify-equivalence")
def verify_equivalence(
    model: str = ModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    method: str = typer.Option("memit", help="Method(s), comma separated, or 'all'."),
    alignment: Optional[str] = typer.Option(
        None, help="Alignment(s), comma separated, or 'all' (default: each method's first)."
    ),
    facts: Optional[str] = typer.Option(None, help="Facts file (default: CounterFact from the shared data)."),
    n: int = typer.Option(200, "--n", min=1, help="Number of facts."),
    batch_size: int = typer.Option(20, "--batch-size", "-b", min=1, help="Facts per sequential step."),
    split: Optional[str] = typer.Option(None, help="CounterFact split (default: train of the shared CounterFact)."),
    layers: Optional[str] = LayersOpt,
    lam: Optional[float] = LamOpt,
    v_steps: Optional[int] = VStepsOpt,
    ridge: Optional[float] = typer.Option(None, help="Ridge ρ (rlsedit: its λ²); default per method."),
    stats_tokens: Optional[int] = typer.Option(None, "--stats-tokens", min=1, help="Σ₀ token budget (default: preset)."),
    tol: float = typer.Option(1e-10, help="Largest relative gap accepted for the aligned forms."),
    as_json: bool = JsonOpt,
) -> None:
    """Sequential vs one-time editing on the same real (K, V): per-layer relative gap ‖W_SE − W_OTE‖/‖W_OTE − W₀‖.

    Keys and values are read once on the unedited model (cached). Aligned forms must stay below
    --tol (prune/rect: W + Δ before post-processing); naive forms show their gap. Exits with 1 if
    an aligned form fails.
    """
    from ..errors import SeqEditError
    from ..evaluate.equivalence import verify_equivalence as run
    from ..models.presets import preset_for
    from ..shared_data import counterfact_path

    specs = _specs(method, alignment, {"ridge": ridge})
    fs = read_facts(facts or str(counterfact_path()), n, split or (None if facts else "train"), "auto")
    check_edit(model, None, None, "sequential", parse_layers(layers), lam, v_steps, None, None)
    lm, _ = load(model, dtype, device_map)
    hp = preset_for(lm.name, lm.adapter.n_layers).override(
        layers=parse_layers(layers), lam=lam, v_steps=v_steps, stats_tokens=stats_tokens
    ).for_formats(1)  # equivalence edits bare prompts
    t = time.perf_counter()
    try:
        with progress_bars(not as_json) as cb:
            rows = run(lm, specs, fs, hp, batch_size, tol=tol, progress=cb)
    except (SeqEditError, ValueError, OSError) as e:
        fail(str(e))
    secs = time.perf_counter() - t
    failed = [r for r in rows if r.passed is False]
    if as_json:
        out.print_json(
            data={
                "model": lm.name,
                "n_facts": len(fs),
                "batch_size": batch_size,
                "tolerance": tol,
                "hparams": hp.to_dict(),
                "seconds": secs,
                "rows": [r.to_dict() for r in rows],
                "passed": not failed,
            }
        )
    else:
        steps = rows[0].steps if rows else 0
        table = Table(
            title=f"SE ({steps} steps of {batch_size}) vs OTE on {lm.name}, {len(fs)} facts: "
            "‖W_SE − W_OTE‖_F / ‖W_OTE − W₀‖_F"
        )
        for col in ("method", "layer", "deployed", "before R_p", "claim"):
            table.add_column(col, justify="right" if col != "method" else "left")
        for r in rows:
            claim = {True: "[green]≡ OTE[/]", False: "[red]FAIL[/]", None: "[dim]control[/]"}[r.passed]
            raw = "" if r.gap_raw is None else f"{r.gap_raw:.2e}"
            table.add_row(r.method, str(r.layer), f"{r.gap_deployed:.2e}", raw, claim)
        out.print(table)
        out.print(f"{len(rows)} rows in {secs:.1f} s (keys/values cached after the first run)")
    if failed:
        console.print(f"[bold red]{len(failed)} aligned row(s) above {tol:g}[/]")
        raise typer.Exit(1)
