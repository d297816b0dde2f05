"""Fork server for tests/unit/test_ledger_crash.py: imports everything once, then for every "go" line on stdin
forks a child that reopens the ledger and applies cheap steps forever, appending "committed N" to the
log after each commit; the test SIGKILLs the child at a random moment. Prints the child's pid, then
"done" once it has been reaped.

    python ledger_crash_worker.py LEDGER_DIR LOG_FILE
"""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)  # before any parallel op: OpenMP pools and fork() do not mix

from fork_server import serve_forks  # noqa: E402
from ledger_helpers import make_editor, next_op  # noqa: E402

from seqedit.testing import tiny_model  # noqa: E402

def work(ledger: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    editor = make_editor(ledger, snapshot_every=3)
    editor.prepare()
    os.write(fd, f"ready {editor.ledger.last_step}\n".encode())
    while True:
        step = editor.ledger.last_step + 1
        next_op(editor, step)
        os.write(fd, f"committed {step}\n".encode())


def main() -> None:
    ledger, log = sys.argv[1], sys.argv[2]
    tiny_model("llama")  # trains and caches the tokenizer once, before forking
    serve_forks(lambda args: work(ledger, log))


if __name__ == "__main__":
    main()
