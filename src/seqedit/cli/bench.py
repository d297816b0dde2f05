"""Showcase and timing commands: ``seqedit bench`` (per-step timings and efficacy of an editing run)
and ``seqedit demo`` (a few CounterFact edits, answers before and after)."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.table import Table

from .common import (
    DeviceMapOpt, DtypeOpt, JsonOpt, LamOpt, LayersOpt, ModelOpt, PresetOpt, SetOpt, VStepsOpt, app, load, out, parse_layers,
    parse_sets, progress_bars, read_facts,
)
from .preflight import check_edit

if TYPE_CHECKING:
    from ..facts import Fact
    from ..models.load import LoadedModel


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _efficacy(lm: LoadedModel, fs: Sequence[Fact]) -> dict[str, Any]:
    """CounterFact efficacy on the edit prompts: P(new) > P(true) by length-normalised NLL."""
    from ..evaluate.scoring import score_targets

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
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    facts: Optional[str] = typer.Option(None, help="Facts file (default: CounterFact from the shared data)."),
    n: int = typer.Option(200, "--n", min=1, help="Number of facts."),
    batch_size: int = typer.Option(100, "--batch-size", "-b", min=1),
    split: Optional[str] = typer.Option(None, help="CounterFact split (default: train of the shared CounterFact)."),
    layers: Optional[str] = LayersOpt,
    lam: Optional[float] = LamOpt,
    v_steps: Optional[int] = VStepsOpt,
    preset: Optional[str] = PresetOpt,
    sets: Optional[list[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Time an editing run (per step: keys / values / solve / apply) and its efficacy."""
    import torch

    from ..editor import Editor
    from ..locate.values import upper_blocks_dtype
    from ..shared_data import counterfact_path

    overrides = parse_sets(sets, layers=parse_layers(layers), lam=lam, v_steps=v_steps)
    # a split applies to CounterFact files only: the default one is the shared CounterFact's train split
    fs = read_facts(facts or str(counterfact_path()), n, split or (None if facts else "train"), "auto")
    check_edit(model, None, None, "sequential", overrides.get("layers"), overrides.get("lam"), overrides.get("v_steps"),
               None, None, preset=preset)  # the values the run will use, however they were spelt
    lm, load_s = load(model, dtype, device_map)
    t = time.perf_counter()
    before = _efficacy(lm, fs)
    eval_s = time.perf_counter() - t
    editor = Editor(lm, preset=preset, **overrides)
    with progress_bars(not as_json) as cb:
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
        "torch_threads": torch.get_num_threads(),
        # what v_compute_dtype resolved to on this machine ("auto" depends on the hardware)
        "value_compute_dtype": str(upper_blocks_dtype(lm, editor.hparams)).removeprefix("torch."),
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
                f"{w['delta_gflop'] / max(s['values'], 1e-9):.0f} GFLOP/s, upper blocks in "
                f"{result['value_compute_dtype']}"
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
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    n: int = typer.Option(3, "--n", min=1, help="How many CounterFact facts to edit."),
    prompt_format: Optional[str] = typer.Option(
        None, "--prompt-format", help="bare | chat | both (default: both when the model has a chat template)."),
) -> None:
    """Edit a few real CounterFact facts and show the model's answers before and after."""
    from ..editor import Editor
    from ..evaluate.chat import chat_replies, names_target
    from ..evaluate.scoring import greedy_completions, score_targets
    from ..locate.chat import check_prompt_format, question_template
    from ..shared_data import counterfact_path

    if prompt_format is not None:
        check_prompt_format(prompt_format)

    t0 = time.perf_counter()
    fs = read_facts(str(counterfact_path()), n, "train", "auto")
    lm, load_s = load(model, dtype, device_map)
    out.print(f"loaded {lm.name} in {load_s:.1f} s")

    def snapshot() -> list[tuple[str, float, float]]:
        comps = greedy_completions(lm, [f.text for f in fs], 6)
        sc = score_targets(lm, [(f.text, f.target) for f in fs] + [(f.text, f.true_target or f.target) for f in fs])
        return [(c, sc[i].prob, sc[len(fs) + i].prob) for i, c in enumerate(comps)]

    chat = bool(getattr(lm.tokenizer, "chat_template", None))
    prompt_format = prompt_format or ("both" if chat else "bare")
    # every edited fact is asked, so the chat answers shown are not a pick of the ones that carried over
    questions = [question_template(f.text) for f in fs]
    t = time.perf_counter()
    before = snapshot()
    replies_before = chat_replies(lm, questions, 16) if chat else []
    before_s = time.perf_counter() - t
    editor = Editor(lm, prompt_format=prompt_format)
    with progress_bars() as cb:
        report = editor.apply(fs, progress=cb)
    after = snapshot()
    table = Table(title=f"{len(fs)} CounterFact facts edited into {lm.name} (prompt format: {prompt_format})")
    for col in ("prompt", "new / old target", "completion before", "completion after", "P(new)", "P(old)"):
        table.add_column(col)
    for f, b, a in zip(fs, before, after):
        table.add_row(
            f.text, f"{f.target} / {f.true_target}", b[0].strip(), f"[bold]{a[0].strip()}[/]",
            f"{b[1]:.3f} → {a[1]:.3f}", f"{b[2]:.3f} → {a[2]:.3f}",
        )
    out.print(table)
    if chat:
        replies_after = chat_replies(lm, questions, 16)
        out.print("the same facts asked through the chat template (greedy, 16 tokens):")
        for f, q, b, a in zip(fs, questions, replies_before, replies_after):
            verdict = "names" if names_target(a, f.target) else "does not name"
            out.print(f"  user: {q}\n    assistant before: {b.strip()}\n    assistant after:  [bold]{a.strip()}[/]"
                      f"\n    ({verdict} the new target '{f.target}')", highlight=False)
    s = report.seconds
    out.print(
        f"time: load {load_s:.1f} s · scoring {before_s:.1f} s · Σ₀ {editor.setup_seconds['stats']:.1f} s "
        f"(cached after the first run) · templates {s['templates']:.1f} s · values {s['values']:.1f} s · "
        f"keys {s['keys']:.1f} s · solve {s['solve']:.2f} s · total {time.perf_counter() - t0:.1f} s"
    )
