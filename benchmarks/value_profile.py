"""Where the value pass spends its time: a ``torch.profiler`` run of ``compute_values`` on the embedded model.

The value optimisation labels its phases (``record_function`` in ``locate/values.py``): the rows and
their prefix KV cache, the first suffix forward (which also runs blocks 0..z once), the later suffix
forwards (blocks above the z-layer, attention over the cached prefix), the heads (unembedding,
log-softmax and losses at the scored positions), the backward pass, and Adam with its bookkeeping.
Each operator is charged to the innermost phase that encloses it. Per phase the table gives wall
seconds, the FLOPs of its matrix products (the profiler's count for ``mm``/``addmm``/``bmm``/
``matmul``, SDPA's counted from its shapes) and the rate they ran at, against this machine's GEMM rate on the model's
shapes measured in the same process, in float32 and in the precision the upper blocks ran in.

    python benchmarks/value_profile.py --n 50 --out docs/results/value-profile-float32.json
    python benchmarks/value_profile.py --n 50 --set v_compute_dtype=bfloat16 --out docs/results/value-profile-bfloat16.json
    python benchmarks/value_profile.py --n 100 --timers --out docs/results/value-profile/stop42/timers.json

``--timers`` runs without the profiler (whose overhead grew past 10× under torch 2.13): each phase label is
timed with a wall clock instead, so the seconds are the unprofiled pass's; FLOPs are then only the total
δ-work's.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import seqedit
from seqedit.atomic import atomic_write_json
from seqedit.datasets import load_facts
from seqedit.locate import values as values_module
from seqedit.locate.values import compute_values, upper_blocks_dtype
from seqedit.shared_data import counterfact_path

PHASES = ("values.rows_and_prefix_cache", "values.forward.first", "values.forward", "values.heads",
          "values.backward", "values.adam_and_bookkeeping")


def gemm_rate(dtype: torch.dtype, m: int, k: int, n: int, reps: int = 20) -> float:
    """GFLOP/s of ``[m, k] × [k, n]`` in ``dtype`` on this machine's threads."""
    a, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    torch.nn.functional.linear(a, w)
    t = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(a, w)
    return 2.0 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def phase_of(event) -> str:
    e = event
    while e is not None:
        if e.name in PHASES:
            return e.name
        e = e.cpu_parent
    return "other"


def sdpa_flops(event) -> float:
    """2·(q·kᵀ) + 2·(p·v) FLOPs of one SDPA call from its recorded shapes ``q: [b, h, s, d], k: [b, h, t, d]``."""
    shapes = event.input_shapes or []
    if len(shapes) < 2 or len(shapes[0]) != 4 or len(shapes[1]) != 4:
        return 0.0
    b, h, s, d = shapes[0]
    t = shapes[1][2]
    return 4.0 * b * h * s * t * d


def timed_phases(lm, facts, templates, hp) -> tuple[object, float, dict[str, float]]:
    """``compute_values`` with each phase label timed by a wall clock (no profiler): values, wall, seconds."""
    seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def timer(name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            seconds[name] += time.perf_counter() - t

    real = values_module.record_function
    values_module.record_function = timer
    try:
        t = time.perf_counter()
        values = compute_values(lm, facts, templates, hp)
        wall = time.perf_counter() - t
    finally:
        values_module.record_function = real
    return values, wall, dict(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="CounterFact train facts in file order (seqedit bench's)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="hyperparameter override, k=v")
    ap.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace here")
    ap.add_argument("--timers", action="store_true", help="wall-clock phase timers instead of the profiler")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = seqedit.load_model("smollm2-135m")
    hp = seqedit.preset_for(lm.name, lm.adapter.n_layers)
    if args.sets:
        hp = hp.override(**type(hp).parse_assignments(args.sets))
    facts = load_facts(str(counterfact_path()), split="train", limit=args.n, distinct=True)
    templates = seqedit.Editor(lm, hparams=hp).templates()
    compute_values(lm, facts[:2], templates, hp)  # warm-up: allocator, oneDNN kernels
    if args.timers:
        values, wall, seconds = timed_phases(lm, facts, templates, hp)
        delta_gflop = values.delta_flops(lm, hp.z_layer) / 1e9
        rows = [{"phase": ph, "seconds": seconds.get(ph, 0.0), "share": seconds.get(ph, 0.0) / wall}
                for ph in PHASES]
        rows.append({"phase": "other", "seconds": wall - sum(seconds.values()),
                     "share": 1 - sum(seconds.values()) / wall})
        print(f"{len(facts)} facts, {torch.get_num_threads()} threads: {wall:.1f} s, δ-work {delta_gflop:.0f} GFLOP "
              f"at {delta_gflop / wall:.0f} GFLOP/s, {sum(values.steps) / len(values.steps):.2f} value steps a fact")
        for r in rows:
            print(f"{r['phase']:32} {r['seconds']:7.2f} {r['share']:6.1%}")
        if args.out:
            atomic_write_json(args.out, {"model": lm.name, "n": len(facts), "threads": torch.get_num_threads(),
                                         "hparams": hp.to_dict(), "timers": True, "wall_seconds": wall,
                                         "mean_value_steps": sum(values.steps) / len(values.steps),
                                         "delta_gflop": delta_gflop, "delta_gflop_per_s": delta_gflop / wall,
                                         "phases": rows})
        return

    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        t = time.perf_counter()
        values = compute_values(lm, facts, templates, hp)
        wall = time.perf_counter() - t
    if args.trace:
        prof.export_chrome_trace(str(args.trace))

    seconds: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    mm_seconds: dict[str, float] = defaultdict(float)
    phase_ops: dict[tuple[str, str], float] = defaultdict(float)
    for e in prof.events():
        if e.name in PHASES:
            seconds[e.name] += e.cpu_time_total / 1e6  # a phase label's interval: its wall time
            continue
        phase = phase_of(e)
        phase_ops[(phase, e.name)] += e.self_cpu_time_total / 1e6  # self time: nested calls count once
        f = float(e.flops or 0)  # the profiler counts the leaf matrix products (mm, addmm, bmm)
        if e.name == "aten::scaled_dot_product_attention":
            f = sdpa_flops(e)
        if f:
            flops[phase] += f
            mm_seconds[phase] += e.cpu_time_total / 1e6

    dtype = upper_blocks_dtype(lm, hp)
    name = str(dtype).removeprefix("torch.")
    d, d_ff = lm.adapter.dims(hp.z_layer)[:2]
    limit = {str(t).removeprefix("torch."): min(gemm_rate(t, 600, d, d_ff), gemm_rate(t, 600, d_ff, d))
             for t in {torch.float32, dtype}}
    rows = []
    for ph in (*PHASES, "other"):
        s = seconds.get(ph, 0.0)
        rows.append({"phase": ph, "seconds": s, "share": s / wall if wall else 0.0, "gflop": flops.get(ph, 0.0) / 1e9,
                     "matmul_seconds": mm_seconds.get(ph, 0.0),
                     "gflop_per_s": flops.get(ph, 0.0) / 1e9 / s if s else 0.0})
    delta_gflop = values.delta_flops(lm, hp.z_layer) / 1e9
    ops: dict[str, float] = defaultdict(float)
    for (_, op), sec in phase_ops.items():
        ops[op] += sec
    result = {
        "model": lm.name, "n": len(facts), "threads": torch.get_num_threads(), "hparams": hp.to_dict(),
        "wall_seconds": wall, "mean_value_steps": sum(values.steps) / len(values.steps),
        "delta_gflop": delta_gflop, "delta_gflop_per_s": delta_gflop / wall,
        "gemm_limit_gflop_per_s": limit, "phases": rows,
        "top_ops": sorted(({"op": k, "seconds": v} for k, v in ops.items()), key=lambda r: -r["seconds"])[:15],
        "top_ops_by_phase": {ph: sorted(({"op": k, "seconds": v} for (p, k), v in phase_ops.items() if p == ph),
                                        key=lambda r: -r["seconds"])[:6] for ph in PHASES},
    }
    lim = limit[name]
    print(f"{len(facts)} facts, {torch.get_num_threads()} threads, upper blocks in {dtype}: {wall:.1f} s, "
          f"δ-work {delta_gflop:.0f} GFLOP at {delta_gflop / wall:.0f} GFLOP/s (GEMM limit {lim:.0f})")
    print(f"{'phase':32} {'s':>7} {'share':>6} {'GFLOP':>8} {'GFLOP/s':>8} {'of limit':>8}")
    for r in rows:
        print(f"{r['phase']:32} {r['seconds']:7.2f} {r['share']:6.1%} {r['gflop']:8.0f} {r['gflop_per_s']:8.0f} "
              f"{r['gflop_per_s'] / lim:8.1%}")
    for ph, top in result["top_ops_by_phase"].items():
        print(ph + ": " + ", ".join(f"{r['op'].removeprefix('aten::')} {r['seconds']:.2f}" for r in top))
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
