"""Bare-vs-chat table of issue 16: one ``seqedit eval`` results folder per (dataset, editing format).

Reads ``RUNS/<dataset>/<format>[-<variant>]/results.json`` (formats ``bare``, ``chat``, ``both``; each
run with ``--chat-eval``; a variant is the same format edited with other settings, e.g. ``both-averaged``
for ``--set format_columns=false``, shown as "`both`, averaged"; dashes in a variant's name read as commas)
and prints one markdown row per run, plus the pre-edit row of each
dataset: the edit metrics measured as bare completions and through the chat template, and WikiText-2
perplexity. Runs still in progress (``seqedit eval --checkpoint``) are shown with the edits done so far.

    for fmt in bare chat both; do
      seqedit eval --out runs/chat-500/counterfact/$fmt --dataset counterfact --split train --n 500 \\
        --batch-size 100 --methods memit --alignment aligned --modes se --checkpoint \\
        --general-n 0 --fluency-n 0 --prompt-format $fmt --chat-eval
    done
    python benchmarks/chat_table.py runs/chat-500 > docs/results/chat-500.md
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from seqedit.evaluate.schema import DriftSummary, EditMetrics, FinalMetrics, read_results

FORMATS = ("bare", "chat", "both")
# (column, metric names in a point's edit metrics, the first one present wins; chat: of its chat-template
# metrics): ZsRE's bare specificity is the agreement with the unedited model's argmax on the neighbour
# question (the paper's Eq. 39)
COLUMNS = [("bare Eff.", False, ("efficacy",)), ("bare Gen.", False, ("generalization",)),
           ("bare Spe.", False, ("specificity", "specificity_vs_pre_edit")),
           ("chat Eff.", True, ("efficacy",)), ("chat Gen.", True, ("generalization",)),
           ("chat Spe.", True, ("specificity",)), ("chat answer (new)", True, ("answer_new",))]


def _value(edit: EditMetrics | None, chat: bool, names: tuple[str, ...]) -> float | None:
    holder = edit.chat if chat and edit is not None else edit
    if holder is None:
        return None
    return next((v for name in names if (v := holder.metric(name)) is not None), None)


def _row(label: str, edits: Any, edit: EditMetrics | None, drift: DriftSummary | None) -> str:
    """One table row: the edit metrics ×100 (``–`` where not measured) and the perplexity."""
    values = [_value(edit, chat, names) for _, chat, names in COLUMNS]
    cells = [f"{100 * v:.1f}" if v is not None else "–" for v in values]
    ppl = None if drift is None else drift.ppl
    cells.append(f"{ppl:.2f}" if ppl is not None else "–")
    return f"| {label} | {edits} | " + " | ".join(cells) + " |"


def _run_folders(dataset: Path) -> list[tuple[Path, str]]:
    """``(folder, label)`` of a dataset's runs: each format, then its variants in name order."""
    out = []
    for fmt in FORMATS:
        out.append((dataset / fmt, f"`{fmt}`"))
        variants = sorted(p for p in dataset.glob(f"{fmt}-*") if p.is_dir())
        out += [(p, f"`{fmt}`, " + p.name[len(fmt) + 1:].replace("-", ", ")) for p in variants]
    return out


def table(runs: Path) -> str:
    """The markdown table of every ``<dataset>/<format>/results.json`` under ``runs``."""
    lines = ["| dataset / editing format | edits | " + " | ".join(c for c, _, _ in COLUMNS) + " | PPL |",
             "|---|---:|" + "---:|" * (len(COLUMNS) + 1)]
    for ds in sorted(p.name for p in runs.iterdir() if p.is_dir()):
        pre_done = False
        for folder, name in _run_folders(runs / ds):
            f = folder / "results.json"
            if not f.is_file():
                continue
            data = read_results(f)
            if not pre_done and data.baseline is not None:
                lines.append(_row(f"{ds} / pre-edit", 0, data.baseline.edit, data.baseline.drift))
                pre_done = True
            for key, cfg in data.configs.items():
                if not key.endswith("/se"):
                    continue
                last = cfg.curve[-1] if cfg.curve else None
                edits = "–" if last is None else last.edits
                if cfg.status == "done":
                    final = cfg.final or FinalMetrics()
                    lines.append(_row(f"{ds} / {name}", edits, final.edit, final.drift))
                else:  # a checkpointed run still going: only its curve's drift is known
                    lines.append(_row(f"{ds} / {name} (running)", edits, None, None if last is None else last.drift))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="folder holding <dataset>/<format>/results.json")
    print(table(ap.parse_args().runs), end="")


if __name__ == "__main__":
    main()
