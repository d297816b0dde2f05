"""This machine's matrix-multiply rate on the embedded model's FFN shapes, the unit of a "GEMM-GFLOP"
step cost (issue 34: seconds × this rate). Run it right before and after a ``seqedit bench`` whose
seconds it normalises: the rate of a shared machine moves by 10-20 % within an hour.

    python benchmarks/gemm_rates.py --threads 2
"""

from __future__ import annotations

import argparse

import torch

from value_profile import gemm_rate

SHAPES = ((4096, 576, 1536), (4096, 1536, 576))  # [tokens, d] × [d, d_in] (up/gate) and its transpose (down)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in (torch.float32, torch.bfloat16):
        rates = [[round(gemm_rate(dtype, *shape, reps=30)) for _ in range(args.repeats)] for shape in SHAPES]
        print(f"{dtype}: GFLOP/s " + " | ".join(f"{'×'.join(map(str, s))}: {r}" for s, r in zip(SHAPES, rates)))


if __name__ == "__main__":
    main()
