"""One rank of the data-parallel Σ₀ test (``test_devices.py``): ``python stats_dist_worker.py RANK WORLD
PORT CORPUS OUT``. Joins the process group as a ``torchrun`` rank would (environment variables; gloo
on CPU), runs ``layer_stats`` on a tiny llama and saves each layer's Gram matrix and token count to
``OUT``."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from seqedit.locate.stats import join_launched_group, layer_stats
from seqedit.testing import tiny_model

LAYERS = (1, 2)
N_TOKENS, SEQ_LEN, BATCH = 1500, 48, 3


def main(rank: int, world: int, port: int, corpus: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    assert join_launched_group() == (rank, world)
    try:
        stats = layer_stats(tiny_model("llama"), LAYERS, corpus, N_TOKENS, SEQ_LEN, batch_size=BATCH)
        save_file({f"gram{l}": s.gram for l, s in stats.items()}
                  | {f"count{l}": torch.tensor([s.count]) for l, s in stats.items()}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    r, w, p, c, o = sys.argv[1:6]
    main(int(r), int(w), int(p), c, o)
