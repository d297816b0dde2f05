"""``seqedit`` command line: edit, generate, stats, verify-equivalence, bench, demo."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="Sequential knowledge editing whose every step equals the one-time solution.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
out = Console()

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="HF id, local directory, or 'smollm2-135m'.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
LayersOpt = typer.Option(None, "--layers", help="Edited layers, comma separated (default: model preset).")
LamOpt = typer.Option(None, "--lam", help="Preservation weight λ of λ·Σ₀ (default: model preset).")
VStepsOpt = typer.Option(None, "--v-steps", help="Value-optimisation step budget (default: model preset).")


def _layers(spec: Optional[str]) -> Optional[tuple[int, ...]]:
    if not spec:
        return None
    try:
        return tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise typer.BadParameter(f"--layers must be comma-separated integers, got {spec!r}") from None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def _progress(enabled: bool = True) -> Iterator:
    """Yields an editor progress callback ``cb(phase, advance, total)`` drawing Rich bars."""
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, int] = {}

        def cb(phase: str, advance: int, total: Optional[int]) -> None:
            if phase == "stats-total":
                tasks["stats"] = bar.add_task("Σ₀ statistics (tokens)", total=total)
                return
            if phase not in tasks or (bar.tasks[tasks[phase]].finished and phase != "stats"):
                label = {"values": "value optimisation (facts)", "layers": "layer solves"}.get(phase, phase)
                tasks[phase] = bar.add_task(label, total=total)
            bar.advance(tasks[phase], advance)

        yield cb


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {escape(msg)}")
    raise typer.Exit(2)


def _load(model: str):
    from .errors import SeqEditError
    from .models.load import load_model

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the spinner says it; tqdm bars would garble Rich's output
    t = time.perf_counter()
    try:
        with console.status(f"loading {model} …"):
            lm = load_model(model)
    except SeqEditError as e:
        _fail(str(e))
    return lm, time.perf_counter() - t


def _facts(path: str, n: Optional[int], split: Optional[str], fmt: str):
    from .errors import SeqEditError
    from .facts import load_facts

    try:
        return load_facts(path, format=fmt, split=split, limit=n)
    except (SeqEditError, OSError) as e:
        _fail(str(e))


@app.command()
def edit(
    facts: str = typer.Argument(..., help="Facts file (JSON/JSONL: CounterFact, ZsRE or plain)."),
    model: str = ModelOpt,
    method: Optional[str] = typer.Option(
        None, help="memit | alphaedit | prune | rect | rlsedit | memorize_latest (default: memit, or the ledger's)."
    ),
    alignment: Optional[str] = typer.Option(None, help="aligned | naive | ... (default: the method's first)."),
    mode: str = typer.Option("sequential", help="sequential | one_time."),
    batch_size: int = typer.Option(100, "--batch-size", "-b", help="Facts per sequential step."),
    ledger: Optional[Path] = typer.Option(
        None, "--ledger", "-l", help="Ledger directory: created, or reopened and continued (durable steps)."
    ),
    n: Optional[int] = typer.Option(None, "--n", help="Use only the first N facts (after --split)."),
    split: Optional[str] = typer.Option(None, help="CounterFact split: edit | train."),
    fmt: str = typer.Option("auto", "--format", help="Facts file layout (auto-detected)."),
    layers: Optional[str] = LayersOpt,
    lam: Optional[float] = LamOpt,
    v_steps: Optional[int] = VStepsOpt,
    save: Optional[Path] = typer.Option(None, "--save", help="Write the edited model here (HF directory)."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompts to complete after editing."),
    as_json: bool = JsonOpt,
) -> None:
    """Edit FACTS into a model, step by step, and report each step."""
    from .editor import Editor
    from .errors import SeqEditError
    from .evaluate.scoring import greedy_completions

    fs = _facts(facts, n, split, fmt)
    edited_layers = _layers(layers)
    lm, _ = _load(model)
    try:
        editor = Editor(
            lm, method=method, mode=mode, alignment=alignment, layers=edited_layers, lam=lam, v_steps=v_steps,
            ledger=ledger,
        )
        with editor, _progress(not as_json) as cb:
            reports = editor.run(fs, batch_size=batch_size, progress=cb)
    except (SeqEditError, ValueError, OSError) as e:
        _fail(str(e))
    completions = dict(zip(prompt, greedy_completions(lm, prompt))) if prompt else {}
    if save:
        lm.model.save_pretrained(save)
        lm.tokenizer.save_pretrained(save)
    if as_json:
        out.print_json(
            data={
                "model": lm.name,
                "method": editor.spec.label,
                "mode": mode,
                "hparams": editor.hparams.to_dict(),
                "setup_seconds": editor.setup_seconds,
                "steps": [r.to_dict() for r in reports],
                "completions": completions,
                "saved": str(save) if save else None,
                "ledger": str(ledger) if ledger else None,
            }
        )
        return
    table = Table(title=f"{len(fs)} facts edited into {lm.name} ({editor.spec.label}, {mode})")
    for col in ("step", "facts", "values s", "keys s", "solve s", "total s", "‖Z−H‖ before → after"):
        table.add_column(col, justify="right")
    for r in reports:
        s = r.seconds
        table.add_row(
            str(r.id), str(len(r.facts)), f"{s['values']:.1f}", f"{s['keys']:.1f}", f"{s['solve']:.2f}",
            f"{s['total']:.1f}", f"{r.target_norm:.1f} → {r.final_residual:.1f}",
        )
    out.print(table)
    for p, c in completions.items():
        out.print(f"[bold]{p}[/]{c}")
    if save:
        out.print(f"edited model written to {save}")
    if ledger:
        replaced = sum(len(r.removed) for r in reports)
        out.print(f"committed to ledger {ledger} (steps {reports[0].id}–{reports[-1].id}, {replaced} facts replaced)")


@app.command()
def generate(
    prompt: list[str] = typer.Argument(..., help="Prompts to complete."),
    model: str = ModelOpt,
    max_new_tokens: int = typer.Option(12, "--max-new-tokens"),
    as_json: bool = JsonOpt,
) -> None:
    """Greedy completions of PROMPT(s) by a model."""
    from .evaluate.scoring import greedy_completions

    lm, _ = _load(model)
    comps = greedy_completions(lm, prompt, max_new_tokens)
    if as_json:
        out.print_json(data={"model": lm.name, "completions": dict(zip(prompt, comps))})
        return
    for p, c in zip(prompt, comps):
        out.print(f"[bold]{p}[/]{c}")


@app.command()
def stats(
    model: str = ModelOpt,
    layers: Optional[str] = LayersOpt,
    corpus: Optional[Path] = typer.Option(None, help="Text file (default: WikiText-2 valid)."),
    tokens: Optional[int] = typer.Option(None, help="Token budget (default: model preset)."),
    as_json: bool = JsonOpt,
) -> None:
    """Precompute and cache Σ₀ (the second moment of keys) for the edited layers in one pass."""
    from .facts import wikitext_path
    from .locate.stats import layer_stats
    from .models.presets import preset_for

    lm, _ = _load(model)
    hp = preset_for(lm.name, lm.adapter.n_layers).override(layers=_layers(layers), stats_tokens=tokens)
    path = corpus or wikitext_path("valid")
    t = time.perf_counter()
    with _progress(not as_json) as cb:
        st = layer_stats(
            lm, hp.layers, path, hp.stats_tokens, hp.stats_seq_len,
            progress=(lambda k: cb("stats", k, None)) if cb else None,
            on_total=(lambda k: cb("stats-total", 0, k)) if cb else None,
        )
    secs = time.perf_counter() - t
    rows = {
        l: {"tokens": s.count, "trace": float(s.sigma0.trace()), "d_in": s.gram.shape[0]} for l, s in st.items()
    }
    if as_json:
        out.print_json(data={"model": lm.name, "corpus": str(path), "seconds": secs, "layers": rows})
        return
    table = Table(title=f"Σ₀ for {lm.name} on {path.name} ({secs:.1f} s)")
    for col in ("layer", "d_in", "tokens", "trace Σ₀"):
        table.add_column(col, justify="right")
    for l, r in rows.items():
        table.add_row(str(l), str(r["d_in"]), str(r["tokens"]), f"{r['trace']:.4g}")
    out.print(table)


def _specs(method: str, alignment: Optional[str], options: dict):
    """MethodSpecs for ``--method`` (comma list or ``all``) × ``--alignment`` (comma list, ``all``, or
    omitted = each method's default)."""
    from .methods import METHODS, parse_method

    every = method.strip().lower() == "all"
    names = list(METHODS) if every else [m.strip() for m in method.split(",") if m.strip()]
    specs = []
    try:
        for name in names:
            key = name.lower().replace("-", "_")
            if alignment is None:
                aligns: list[Optional[str]] = [None]
            elif alignment.strip().lower() == "all":
                aligns = list(METHODS.get(key, (None,)))
            else:
                aligns = [a.strip() for a in alignment.split(",") if a.strip()]
                # a list applies to the methods that have those forms; a method named alone must have one
                aligns = [a for a in aligns if key not in METHODS or a in METHODS[key]] or ([] if every else aligns)
            for al in aligns:
                opts = {k: v for k, v in options.items() if v is not None}
                if key == "alphaedit" or (key, al) == ("memorize_latest", "nullspace"):
                    opts.pop("ridge", None)
                specs.append(parse_method(name, al, **opts))
    except ValueError as e:
        _fail(str(e))
    if not specs:
        _fail("--method names no method")
    return specs


@app.command("verify-equivalence")
def verify_equivalence(
    model: str = ModelOpt,
    method: str = typer.Option("memit", help="Method(s), comma separated, or 'all'."),
    alignment: Optional[str] = typer.Option(
        None, help="Alignment(s), comma separated, or 'all' (default: each method's first)."
    ),
    facts: Optional[str] = typer.Option(None, help="Facts file (default: CounterFact from the shared data)."),
    n: int = typer.Option(200, "--n", help="Number of facts."),
    batch_size: int = typer.Option(20, "--batch-size", "-b", help="Facts per sequential step."),
    split: Optional[str] = typer.Option(None, help="CounterFact split (default: train of the shared CounterFact)."),
    layers: Optional[str] = LayersOpt,
    lam: Optional[float] = LamOpt,
    v_steps: Optional[int] = VStepsOpt,
    ridge: Optional[float] = typer.Option(None, help="Ridge ρ (rlsedit: its λ²); default per method."),
    stats_tokens: Optional[int] = typer.Option(None, "--stats-tokens", help="Σ₀ token budget (default: preset)."),
    tol: float = typer.Option(1e-10, help="Largest relative gap accepted for the aligned forms."),
    as_json: bool = JsonOpt,
) -> None:
    """Sequential vs one-time editing on the same real (K, V): per-layer relative gap ‖W_SE − W_OTE‖/‖W_OTE − W₀‖.

    Keys and values are read once on the unedited model (cached). Aligned forms must stay below
    --tol (prune/rect: W + Δ before post-processing); naive forms show their gap. Exits with 1 if
    an aligned form fails.
    """
    from .equivalence import verify_equivalence as run
    from .errors import SeqEditError
    from .facts import counterfact_path
    from .models.presets import preset_for

    specs = _specs(method, alignment, {"ridge": ridge})
    fs = _facts(facts or str(counterfact_path()), n, split or (None if facts else "train"), "auto")
    lm, _ = _load(model)
    hp = preset_for(lm.name, lm.adapter.n_layers).override(
        layers=_layers(layers), lam=lam, v_steps=v_steps, stats_tokens=stats_tokens
    )
    t = time.perf_counter()
    try:
        with _progress(not as_json) as cb:
            rows = run(lm, specs, fs, hp, batch_size, tol=tol, progress=cb)
    except (SeqEditError, ValueError, OSError) as e:
        _fail(str(e))
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


def _efficacy(lm, fs) -> dict:
    """CounterFact efficacy on the edit prompts: P(new) > P(true) by length-normalised NLL."""
    from .evaluate.scoring import score_targets

    with_true = [f for f in fs if f.true_target]
    scores = score_targets(lm, [(f.text, f.target) for f in with_true] + [(f.text, f.true_target) for f in with_true])
    n = len(with_true)
    new, old = scores[:n], scores[n:]
    return {
        "efficacy": sum(a.mean_nll < b.mean_nll for a, b in zip(new, old)) / max(1, n),
        "mean_p_new": sum(a.prob for a in new) / max(1, n),
        "mean_p_true": sum(b.prob for b in old) / max(1, n),
        "n": n,
    }


@app.command()
def bench(
    model: str = ModelOpt,
    facts: Optional[str] = typer.Option(None, help="Facts file (default: CounterFact from the shared data)."),
    n: int = typer.Option(200, "--n", help="Number of facts."),
    batch_size: int = typer.Option(100, "--batch-size", "-b"),
    split: str = typer.Option("train", help="CounterFact split."),
    layers: Optional[str] = LayersOpt,
    lam: Optional[float] = LamOpt,
    v_steps: Optional[int] = VStepsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Time an editing run (per step: keys / values / solve / apply) and its efficacy."""
    from .editor import Editor
    from .facts import counterfact_path

    fs = _facts(facts or str(counterfact_path()), n, split, "auto")
    lm, load_s = _load(model)
    t = time.perf_counter()
    before = _efficacy(lm, fs)
    eval_s = time.perf_counter() - t
    editor = Editor(lm, layers=_layers(layers), lam=lam, v_steps=v_steps)
    with _progress(not as_json) as cb:
        reports = editor.run(fs, batch_size=batch_size, progress=cb)
    after = _efficacy(lm, fs)
    steps = [
        {
            "step": r.id,
            "facts": len(r.facts),
            **{k: round(v, 3) for k, v in r.seconds.items()},
            "mean_value_steps": sum(r.value_steps) / len(r.value_steps),
            "value_work": r.value_work,
        }
        for r in reports
    ]
    result = {
        "model": lm.name,
        "n": len(fs),
        "batch_size": batch_size,
        "hparams": editor.hparams.to_dict(),
        "load_seconds": load_s,
        "stats_seconds": editor.setup_seconds.get("stats", 0.0),
        "factorise_seconds": editor.setup_seconds.get("factorise", 0.0),
        "eval_seconds": eval_s,
        "steps": steps,
        "peak_rss_mb": _peak_rss_mb(),
        "efficacy_before": before,
        "efficacy_after": after,
        "torch_threads": __import__("torch").get_num_threads(),
    }
    if as_json:
        out.print_json(data=result)
        return
    table = Table(title=f"seqedit bench: {lm.name}, {len(fs)} facts in steps of {batch_size}")
    for col in ("step", "facts", "keys s", "values s", "solve s", "apply s", "total s", "value steps/fact"):
        table.add_column(col, justify="right")
    for s in steps:
        table.add_row(
            str(s["step"]), str(s["facts"]), f"{s['keys']:.1f}", f"{s['values']:.1f}", f"{s['solve']:.2f}",
            f"{s['apply']:.3f}", f"{s['total']:.1f}", f"{s['mean_value_steps']:.1f}",
        )
    out.print(table)
    for s in steps:
        w = s["value_work"]
        if w:
            out.print(
                f"step {s['step']} values: {w['delta_gflop']:.0f} GFLOP of δ-dependent work "
                f"({w['suffix_tokens']} suffix tokens, {w['padded_tokens']} with padding, "
                f"{w['iterations']} iterations) in {s['values']:.1f} s = "
                f"{w['delta_gflop'] / max(s['values'], 1e-9):.0f} GFLOP/s"
            )
    out.print(
        f"Σ₀: {result['stats_seconds']:.1f} s (cached after the first run) · factorise: "
        f"{result['factorise_seconds']:.2f} s · peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    out.print(
        f"efficacy on the edited facts: {before['efficacy']:.1%} before → [bold]{after['efficacy']:.1%}[/] after "
        f"(mean P(new) {before['mean_p_new']:.3f} → {after['mean_p_new']:.3f})"
    )


@app.command()
def demo(
    model: str = ModelOpt,
    n: int = typer.Option(3, "--n", help="How many CounterFact facts to edit."),
) -> None:
    """Edit a few real CounterFact facts and show the model's answers before and after."""
    from .editor import Editor
    from .evaluate.scoring import greedy_completions, score_targets
    from .facts import counterfact_path

    t0 = time.perf_counter()
    fs = _facts(str(counterfact_path()), n, "train", "auto")
    lm, load_s = _load(model)
    out.print(f"loaded {lm.name} in {load_s:.1f} s")

    def snapshot() -> list[tuple[str, float, float]]:
        comps = greedy_completions(lm, [f.text for f in fs], 6)
        sc = score_targets(lm, [(f.text, f.target) for f in fs] + [(f.text, f.true_target or f.target) for f in fs])
        return [(c, sc[i].prob, sc[len(fs) + i].prob) for i, c in enumerate(comps)]

    t = time.perf_counter()
    before = snapshot()
    before_s = time.perf_counter() - t
    editor = Editor(lm)
    with _progress() as cb:
        report = editor.apply(fs, progress=cb)
    after = snapshot()
    table = Table(title=f"{len(fs)} CounterFact facts edited into {lm.name}")
    for col in ("prompt", "new / old target", "completion before", "completion after", "P(new)", "P(old)"):
        table.add_column(col)
    for f, b, a in zip(fs, before, after):
        table.add_row(
            f.text, f"{f.target} / {f.true_target}", b[0].strip(), f"[bold]{a[0].strip()}[/]",
            f"{b[1]:.3f} → {a[1]:.3f}", f"{b[2]:.3f} → {a[2]:.3f}",
        )
    out.print(table)
    s = report.seconds
    out.print(
        f"time: load {load_s:.1f} s · scoring {before_s:.1f} s · Σ₀ {editor.setup_seconds['stats']:.1f} s "
        f"(cached after the first run) · templates {s['templates']:.1f} s · values {s['values']:.1f} s · "
        f"keys {s['keys']:.1f} s · solve {s['solve']:.2f} s · total {time.perf_counter() - t0:.1f} s"
    )


from . import cli_eval  # noqa: E402,F401  (registers commands)
from . import cli_ledger  # noqa: E402,F401  (registers commands)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
