"""Editing commands: ``seqedit edit`` (facts into a model, step by step), ``generate`` (greedy
completions) and ``stats`` (precompute the Σ₀ statistics cache)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..progress import Phase, ProgressEvent, counter, emit
from .common import (
    DeviceMapOpt, DtypeOpt, JsonOpt, LamOpt, LayersOpt, ModelOpt, PresetOpt, VStepsOpt, app, fail, load, out,
    parse_layers, progress_bars, read_facts,
)
from .preflight import check_edit, check_ledger, check_prompt_tokens, check_prompts


@app.command()
def edit(
    facts: str = typer.Argument(..., help="Facts file (JSON/JSONL: CounterFact, ZsRE or plain)."),
    model: str = ModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    method: Optional[str] = typer.Option(
        None, help="memit | alphaedit | prune | rect | rlsedit | memorize_latest (default: memit, or the ledger's)."
    ),
    alignment: Optional[str] = typer.Option(None, help="aligned | naive | ... (default: the method's first)."),
    mode: str = typer.Option("sequential", help="sequential | one_time."),
    batch_size: int = typer.Option(100, "--batch-size", "-b", min=1, help="Facts per sequential step."),
    ledger: Optional[Path] = typer.Option(
        None, "--ledger", "-l", help="Ledger directory: created, or reopened and continued (durable steps)."
    ),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="Use only the first N facts (after --split)."),
    split: Optional[str] = typer.Option(None, help="CounterFact split: edit | train."),
    fmt: str = typer.Option("auto", "--format", help="Facts file layout (auto-detected)."),
    layers: Optional[str] = LayersOpt,
    lam: Optional[float] = LamOpt,
    v_steps: Optional[int] = VStepsOpt,
    save: Optional[Path] = typer.Option(None, "--save", help="Write the edited model here (HF directory)."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompts to complete after editing."),
    max_prompt_tokens: int = typer.Option(
        256, "--max-prompt-tokens", min=1, help="Longest fact (prompt with subject, and target) in tokens."),
    prompt_format: Optional[str] = typer.Option(
        None, "--prompt-format", help="bare | chat | both: facts written as completions, asked through the chat "
        "template, or both (default: bare, or the ledger's)."),
    mix_prompt_formats: bool = typer.Option(
        False, "--mix-prompt-formats", help="Allow steps in another prompt format than the ledger's."),
    chat: bool = typer.Option(False, "--chat", help="Ask the --prompt(s) through the chat template."),
    preset: Optional[str] = PresetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Edit FACTS into a model, step by step, and report each step."""
    from ..editor import Editor
    from ..ledger import Ledger
    from ..ledger.manifest import recorded_base
    fs = read_facts(facts, n, split, fmt)
    edited_layers = parse_layers(layers)
    check_prompts(prompt)
    check_edit(model, method, alignment, mode, edited_layers, lam, v_steps, ledger, save, prompt_format,
               mix_prompt_formats, preset=preset)
    check_prompt_tokens(model, [(f"fact {f.id or i}", f"{f.text} {f.target}") for i, f in enumerate(fs, 1)],
                        max_prompt_tokens)
    check_prompt_tokens(model, [(f"prompt {i}", p) for i, p in enumerate(prompt, 1)], max_prompt_tokens, 12)
    if dtype is None and ledger is not None and Ledger.exists(ledger):
        dtype = recorded_base(ledger).get("dtype")  # the base fingerprint includes the dtype
    lm, _ = load(model, dtype, device_map)
    # a new ledger appears with the run's first commit: a failed first step leaves none (seqedit.pending)
    editor = Editor(
        lm, method=method, mode=mode, alignment=alignment, layers=edited_layers, lam=lam, v_steps=v_steps,
        ledger=ledger, prompt_format=prompt_format, mix_prompt_formats=mix_prompt_formats, preset=preset,
    )
    with editor, progress_bars(not as_json) as cb:
        reports = editor.run(fs, batch_size=batch_size, progress=cb)
    completions = dict(zip(prompt, _complete(lm, prompt, 12, chat))) if prompt else {}
    if save:
        lm.model.save_pretrained(save)
        lm.tokenizer.save_pretrained(save)
    if as_json:
        out.print_json(
            data={
                "model": lm.name,
                "method": editor.spec.label,
                "mode": mode,
                "prompt_format": editor.prompt_format,
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
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="HF id, local directory, or 'smollm2-135m' (default: that, or the ledger's base)."),
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    ledger: Optional[Path] = typer.Option(None, "--ledger", "-l", help="Complete with this ledger's edited weights."),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", min=1, help="Tokens generated per prompt."),
    max_prompt_tokens: int = typer.Option(2048, "--max-prompt-tokens", min=1, help="Longest prompt in tokens."),
    chat: bool = typer.Option(
        False, "--chat", help="Send each prompt as a user turn through the model's chat template; print the reply."),
    as_json: bool = JsonOpt,
) -> None:
    """Greedy completions of PROMPT(s) by a model (with --chat: its replies to them as questions)."""

    check_prompts(prompt)
    if ledger is not None:
        model = model or check_ledger(ledger, write=True)["base"]["name"]
    model = model or "smollm2-135m"
    check_prompt_tokens(model, [(f"prompt {i}", p) for i, p in enumerate(prompt, 1)], max_prompt_tokens, max_new_tokens)
    if ledger is None:
        lm, _ = load(model, dtype, device_map)
        comps = _complete(lm, prompt, max_new_tokens, chat)
    else:
        from .ledger import reopened  # here: importing it at the top would list its commands first
        with reopened(ledger, model, dtype=dtype, device_map=device_map) as editor:
            lm = editor.loaded
            comps = _complete(lm, prompt, max_new_tokens, chat)
    if as_json:
        out.print_json(data={"model": lm.name, **({"chat": True} if chat else {}), "completions": dict(zip(prompt, comps))})
        return
    for p, c in zip(prompt, comps):
        out.print(f"[bold]user:[/] {p}\n[bold]assistant:[/] {c}" if chat else f"[bold]{p}[/]{c}", highlight=False)


def _complete(lm, prompts: list[str], max_new_tokens: int, chat: bool) -> list[str]:
    """Greedy completions of ``prompts``, or with ``chat`` the replies to them as user turns."""
    if chat:
        from ..evaluate.chat import chat_replies
        from ..locate.chat import check_chat_template

        check_chat_template(lm.tokenizer)
        return chat_replies(lm, prompts, max_new_tokens)
    from ..evaluate.scoring import greedy_completions

    return greedy_completions(lm, prompts, max_new_tokens)


@app.command()
def stats(
    model: str = ModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    layers: Optional[str] = LayersOpt,
    corpus: Optional[Path] = typer.Option(None, help="Text file (default: WikiText-2 valid)."),
    tokens: Optional[int] = typer.Option(None, min=1, help="Token budget (default: model preset)."),
    as_json: bool = JsonOpt,
) -> None:
    """Precompute and cache Σ₀ (the second moment of keys) for the edited layers in one pass.

    Under ``torchrun --nproc-per-node N -m seqedit.cli stats …`` (or ``accelerate launch``) the corpus
    is split over the N processes (one GPU each) and their sums are all-reduced; rank 0 writes the cache.
    """
    import os

    import torch

    from ..locate.stats import join_launched_group, layer_stats
    from ..models.presets import preset_for
    from ..shared_data import wikitext_path

    if corpus is not None and not corpus.is_file():
        fail(f"--corpus {corpus} is not a file")
    check_edit(model, None, None, "sequential", parse_layers(layers), None, None, None, None)
    rank, world = join_launched_group()
    if world > 1 and device_map is None and torch.cuda.is_available():
        device_map = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    lm, _ = load(model, dtype, device_map)
    hp = preset_for(lm.name, lm.adapter.n_layers).override(layers=parse_layers(layers), stats_tokens=tokens)
    path = corpus or wikitext_path("valid")
    t = time.perf_counter()
    with progress_bars(not as_json) as cb:
        # layer_stats counts tokens and learns their total only once the corpus is read: adapt both
        st = layer_stats(
            lm, hp.layers, path, hp.stats_tokens, hp.stats_seq_len,
            progress=counter(cb, Phase.STATS),
            on_total=(lambda k: emit(cb, ProgressEvent(Phase.STATS, total=k, start=True))) if cb else None,
        )
    secs = time.perf_counter() - t
    if rank != 0:  # one report for the whole group
        return
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
