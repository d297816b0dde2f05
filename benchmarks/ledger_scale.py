"""Ledger bookkeeping at scale: ledgers of N facts in force built from synthetic ``Editor.apply_kv`` steps on
a tiny Llama (fixed keys and values: no value optimisation), then per N the time of a 1-fact and a 100-fact
step, of reopening the ledger (``Editor`` on it: open, restore), of ``seqedit log --json`` and of
``Editor.verify`` (checksums, the hash chain, and the one-time re-solve of every fact in force), and the
disk used. Writes a JSON report and a plot.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ledger_scale.py --sizes 250,4000,10000 \\
        --out docs/results/ledger-scale/after

``--smoke``: sizes 20 and 60, two timed steps each (seconds; the test suite runs it). The issue's sizes
are ``--sizes 10000,100000,1000000``. ``--render BEFORE.json AFTER.json OUT.png`` draws two reports'
step cost side by side (docs/results/ledger-scale).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

LAYERS = (1, 2)
PROMPT = "{} is located in"


def _facts(lo: int, hi: int, tag: str = "f") -> list:
    from seqedit import Fact

    return [Fact(prompt=PROMPT, subject=f"Place {i}", target=f"Town {i}", id=f"{tag}{i}") for i in range(lo, hi)]


def _kv(editor, n: int, gen: torch.Generator) -> tuple[dict, dict]:
    """Keys ``K: [d_in, n]`` of the tiny model's key scale and absolute targets ``V = W₀ K + noise``."""
    K, V = {}, {}
    for l in LAYERS:
        W0 = editor.w0[l]
        k = 0.01 * torch.randn(W0.shape[1], n, generator=gen, dtype=torch.float64)
        K[l], V[l] = k, W0 @ k + 0.1 * torch.randn(W0.shape[0], n, generator=gen, dtype=torch.float64)
    return K, V


def _editor(path: Path):
    from seqedit import Editor
    from seqedit.testing import tiny_model

    return Editor(tiny_model("llama"), ledger=path, layers=LAYERS, stats_tokens=2000, lam=10.0, v_steps=2)


def _step(editor, facts: list, gen: torch.Generator, cpu: list | None = None) -> float:
    """Wall seconds of one ``apply_kv`` step (its CPU seconds appended to ``cpu``: fsync waits excluded)."""
    K, V = _kv(editor, len(facts), gen)
    t, c = time.perf_counter(), time.process_time()
    editor.apply_kv(K, V, facts=facts)
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return time.perf_counter() - t


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(path: Path, n: int, build_batch: int, repeats: int) -> dict[str, Any]:
    """Build a ledger of ``n`` facts at ``path`` in steps of ``build_batch``, then time its operations.
    Step times are medians over ``repeats`` steps (a snapshot falls on every tenth step)."""
    from typer.testing import CliRunner

    from seqedit.cli import app

    gen = torch.Generator().manual_seed(n)
    ed = _editor(path)
    ed.prepare()
    t = time.perf_counter()
    for lo in range(0, n, build_batch):
        _step(ed, _facts(lo, min(n, lo + build_batch)), gen)
    build = time.perf_counter() - t
    cpu_1: list[float] = []
    cpu_100: list[float] = []
    one = [_step(ed, _facts(n + i, n + i + 1), gen, cpu_1) for i in range(repeats)]
    hundred = [_step(ed, _facts(n + repeats + 100 * i, n + repeats + 100 * (i + 1)), gen, cpu_100)
               for i in range(repeats)]
    in_force = len(ed.facts_in_force())
    ed.close()
    t = time.perf_counter()
    ed = _editor(path)
    reopen = time.perf_counter() - t
    t = time.perf_counter()
    rep = ed.verify()
    verify = time.perf_counter() - t
    ed.close()
    t = time.perf_counter()
    res = CliRunner().invoke(app, ["log", "--ledger", str(path), "--json"])
    log = time.perf_counter() - t
    if res.exit_code != 0 or not rep.ok:
        raise SystemExit(f"ledger of {n} facts: log exit {res.exit_code}, verify ok={rep.ok}: {res.output[-500:]}")
    return {"facts": n, "in_force_after": in_force, "build_s": build, "build_batch": build_batch,
            "step_1_s": statistics.median(one), "step_1_all_s": one,
            "step_100_s": statistics.median(hundred), "step_100_all_s": hundred,
            "step_1_cpu_s": statistics.median(cpu_1), "step_100_cpu_s": statistics.median(cpu_100),
            "reopen_s": reopen, "log_s": log, "verify_s": verify, "disk_bytes": _disk(path)}


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["facts"] for r in rows]
    for key, label in (("step_1_s", "1-fact step"), ("step_100_s", "100-fact step")):
        line, = a.plot(x, [1e3 * r[key] for r in rows], "o-", label=f"{label} (wall)")
        a.plot(x, [1e3 * r[key.replace("_s", "_cpu_s")] for r in rows], "x--", color=line.get_color(),
               label=f"{label} (CPU)")
    a.set(xscale="log", xlabel="facts in force", ylabel="ms per step", title="step cost")
    a.set_ylim(bottom=0)
    for key in ("reopen_s", "log_s", "verify_s"):
        b.plot(x, [r[key] for r in rows], "o-", label=key[:-2])
    b.set(xscale="log", yscale="log", xlabel="facts in force", ylabel="seconds", title="reopen / log / verify")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_before_after(before: list[dict], after: list[dict], out: Path) -> None:
    """Step cost (wall and CPU) before and after, side by side on one axis per step size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("step_1", "step_100"), ("1-fact step", "100-fact step")):
        for rows, label, color in ((before, "before", "tab:red"), (after, "after", "tab:blue")):
            x = [r["facts"] for r in rows]
            ax.plot(x, [1e3 * r[f"{key}_s"] for r in rows], "o-", color=color, label=f"{label} (wall)")
            if f"{key}_cpu_s" in rows[0]:
                ax.plot(x, [1e3 * r[f"{key}_cpu_s"] for r in rows], "x--", color=color, label=f"{label} (CPU)")
        ax.set(xscale="log", xlabel="facts in force", ylabel="ms per step", title=title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("ledger step cost, before (2f6f148) and after (hash chain, indexed planning)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    head = ("| facts | 1-fact step (ms) | CPU (ms) | 100-fact step (ms) | CPU (ms) | reopen (s) | log (s) | "
            "verify (s) | disk (MB) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['facts']:,} | {1e3 * r['step_1_s']:.1f} | {1e3 * r['step_1_cpu_s']:.1f} | "
                     f"{1e3 * r['step_100_s']:.1f} | {1e3 * r['step_100_cpu_s']:.1f} | "
                     f"{r['reopen_s']:.2f} | {r['log_s']:.2f} | {r['verify_s']:.2f} | {r['disk_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="250,1000", help="comma-separated numbers of facts in force")
    ap.add_argument("--build-batch", type=int, default=250, help="facts per step while building a ledger")
    ap.add_argument("--repeats", type=int, default=11, help="timed steps per size (median reported)")
    ap.add_argument("--out", type=Path, default=None, help="folder for ledger_scale.json and ledger_scale.png")
    ap.add_argument("--label", default="", help="title of the plot (e.g. before / after)")
    ap.add_argument("--smoke", action="store_true", help="sizes 20 and 60, two timed steps (seconds)")
    ap.add_argument("--render", nargs=3, type=Path, metavar=("BEFORE_JSON", "AFTER_JSON", "PNG"),
                    help="measure nothing: draw the step cost of two reports into PNG and print their tables")
    args = ap.parse_args(argv)
    if args.render:
        before, after = (json.loads(p.read_text())["rows"] for p in args.render[:2])
        plot_before_after(before, after, args.render[2])
        print(f"before\n{table(before)}\n\nafter\n{table(after)}")
        return {"before": before, "after": after}
    torch.set_num_threads(1)
    sizes = [20, 60] if args.smoke else [int(s) for s in args.sizes.split(",")]
    batch, repeats = (20, 2) if args.smoke else (args.build_batch, args.repeats)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ledger-scale-") as tmp:
        for n in sizes:
            path = Path(tmp) / f"L{n}"
            rows.append(measure(path, n, batch, repeats))
            shutil.rmtree(path)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    report = {"sizes": sizes, "layers": list(LAYERS), "model": "tiny-llama", "threads": 1, "repeats": repeats,
              "rows": rows, "step_1_ratio_last_first": rows[-1]["step_1_s"] / rows[0]["step_1_s"]}
    print(table(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ledger_scale.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(rows, args.out / "ledger_scale.png", f"ledger_scale {args.label}".strip())
    return report


if __name__ == "__main__":
    main()
