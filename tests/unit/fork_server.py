"""The loop of the crash tests' fork servers: the parent imports everything once, then for every
``go [ARGS...]`` line on stdin forks a child running ``child(ARGS)``, prints the child's pid, and prints
``done`` once the child has been reaped (the test SIGKILLs it at a random moment). Any other line ends
the loop."""

from __future__ import annotations

import os
import sys
from typing import Callable


def serve_forks(child: Callable[[list[str]], None], exit_code: int = 1) -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "go":
            break
        pid = os.fork()
        if pid == 0:
            try:
                child(words[1:])
            finally:
                os._exit(exit_code)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("done", flush=True)
