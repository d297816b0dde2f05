"""One upper block of the value pass, forward and input-gradient backward, timed and split by operator.

The value pass's δ-work rate mixes many phases (docs/performance.md). This isolates the one that repeats
most: :func:`seqedit.locate.fused_blocks.packed_block` with the embedded model's shapes (d = 576,
9 query and 3 key/value heads of 64, d_ff = 1,536), bfloat16 weight copies, ``--rows`` suffix rows of
``--suffix`` tokens after a cached prefix of ``--prefix`` tokens, random weights (the time does not depend
on them). Prints the block's seconds, its products' share and rate against this machine's bfloat16 GEMM
rate, and the operators that take the rest.

    python benchmarks/block_profile.py --rows 400 --suffix 8 --prefix 20
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

from seqedit.locate.fused_blocks import packed_block
from value_profile import gemm_rate

D, N_HEADS, N_KV, HEAD_DIM, D_FF = 576, 9, 3, 64, 1536


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--suffix", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r, s, p = args.rows, args.suffix, args.prefix
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    bf = torch.bfloat16
    weights = (torch.ones(D), rand((N_HEADS + 2 * N_KV) * HEAD_DIM, D, scale=0.05, dtype=bf), None,
               rand(D, N_HEADS * HEAD_DIM, scale=0.05, dtype=bf), torch.ones(D),
               rand(2 * D_FF, D, scale=0.05, dtype=bf), rand(D, D_FF, scale=0.05, dtype=bf))
    parts = [(r, s, rand(r, N_KV, p, HEAD_DIM), rand(r, N_KV, p, HEAD_DIM),
              torch.ones(r, 1, s, p + s, dtype=torch.bool).tril(p))]
    cos, sin = rand(r * s, 1, HEAD_DIM), rand(r * s, 1, HEAD_DIM)
    h0 = rand(r * s, D)

    def run(reps: int) -> float:
        h = h0.clone().requires_grad_(True)
        t = 0.0
        for i in range(reps + 2):  # two warm-up passes: allocator, oneDNN kernels
            if i == 2:
                t = time.perf_counter()
            out = packed_block(h, parts, cos, sin, *weights, 1e-5, N_HEADS, N_KV, HEAD_DIM, HEAD_DIM**-0.5)
            out.sum().backward()
        return (time.perf_counter() - t) / reps

    sec = run(args.reps)
    with profile() as prof:
        run(2)
    per_pass = 4  # the profiled run makes 2 warm-up + 2 timed passes
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    mm = sum(e.self_cpu_time_total for e in ops if e.key == "aten::mm") / 1e6 / per_pass
    tokens = r * s
    per_token = 2 * D * ((N_HEADS + 2 * N_KV) * HEAD_DIM + N_HEADS * HEAD_DIM + 3 * D_FF)  # FLOPs of the products
    gflop = 2 * tokens * per_token / 1e9  # forward and input gradient
    limit = min(gemm_rate(bf, tokens, D, 2 * D_FF), gemm_rate(bf, tokens, D_FF, D))
    print(f"{r} rows × {s} tokens after {p} cached: {1e3 * sec:.1f} ms forward + backward, products {gflop:.1f} GFLOP "
          f"({gflop / sec:.0f} GFLOP/s overall, {gflop / mm:.0f} within mm; bfloat16 GEMM limit {limit:.0f})")
    for e in ops[:10]:
        print(f"  {e.key[:48]:48} {e.self_cpu_time_total / 1e3 / per_pass:7.1f} ms  {e.count // per_pass:4d} calls")


if __name__ == "__main__":
    main()
