"""Fork server for tests/unit/test_serve_crash.py: imports everything once, then for every "go PORT" line on
stdin forks a child that runs the real ``seqedit serve`` app under uvicorn on 127.0.0.1:PORT over the
ledger TMP_DIR/ledger (tiny llama, ``serve_helpers.make_config``); the test SIGKILLs (or SIGTERMs) the child. Prints the child's pid, then
"done" once it has been reaped.

    python serve_crash_server.py TMP_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # before any parallel op: OpenMP pools and fork() do not mix

import uvicorn  # noqa: E402
from fork_server import serve_forks  # noqa: E402
from serve_helpers import make_config  # noqa: E402

from seqedit.serve import create_app  # noqa: E402
from seqedit.testing import tiny_model  # noqa: E402


def serve(tmp: str, port: int) -> None:
    config = make_config(Path(tmp), port=port, max_batch=16, max_wait_s=0.02)
    app = create_app(config, load=lambda: tiny_model("llama"))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main() -> None:
    tmp = sys.argv[1]
    tiny_model("llama")  # trains and caches the tokenizer once, before forking
    serve_forks(lambda args: serve(tmp, int(args[0])), exit_code=0)


if __name__ == "__main__":
    main()
