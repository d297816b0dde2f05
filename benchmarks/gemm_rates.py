"""This machine's matrix-multiply rate on the embedded model's FFN shapes, the unit of a "GEMM-GFLOP"
step cost (issue 34: seconds × this rate). Run it right before and after a ``seqedit bench`` whose
seconds it normalises: the rate of a shared machine moves by 10-20 % within an hour.

    python benchmarks/gemm_rates.py --threads 2
    python benchmarks/gemm_rates.py --heights 100,200,400,800,1600,3200   # bfloat16 rate against rows

``--heights`` prints the bfloat16 rate of every product of an upper block (q/k/v, gate/up, down, o and
their input-gradient transposes) at each row count: whether one tall product beats several short ones.
"""

from __future__ import annotations

import argparse

import torch

from value_profile import gemm_rate

SHAPES = ((4096, 576, 1536), (4096, 1536, 576))  # [tokens, d] × [d, d_in] (up/gate) and its transpose (down)
# (in, out) of an upper block's products: q/k/v stacked, gate/up stacked, down, o, and the input gradients'
BLOCK_PRODUCTS = ((576, 960), (576, 3072), (1536, 576), (576, 576), (960, 576), (3072, 576), (576, 1536))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heights", default="", help="comma list of row counts: the bfloat16 rate per block product")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.heights:
        print("rows: GFLOP/s of " + ", ".join(f"{k}→{n}" for k, n in BLOCK_PRODUCTS))
        for m in map(int, args.heights.split(",")):
            print(m, [round(gemm_rate(torch.bfloat16, m, k, n, reps=40)) for k, n in BLOCK_PRODUCTS])
        return
    for dtype in (torch.float32, torch.bfloat16):
        rates = [[round(gemm_rate(dtype, *shape, reps=30)) for _ in range(args.repeats)] for shape in SHAPES]
        print(f"{dtype}: GFLOP/s " + " | ".join(f"{'×'.join(map(str, s))}: {r}" for s, r in zip(SHAPES, rates)))


if __name__ == "__main__":
    main()
