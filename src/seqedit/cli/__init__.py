"""The ``seqedit`` command line (``seqedit = "seqedit.cli:app"``).

Importing the command modules registers their commands on the shared Typer :data:`app` of
:mod:`.common`, in the order ``seqedit --help`` lists them:

- :mod:`.edit`: edit, generate, stats
- :mod:`.equivalence`: verify-equivalence
- :mod:`.bench`: bench, demo
- :mod:`.evaluate`: eval, report
- :mod:`.ledger`: forget, undo, log, verify, export
- :mod:`.serve`: serve
"""

from __future__ import annotations

from . import edit, equivalence, bench, evaluate, ledger, serve  # noqa: F401  (registers the commands, in this order)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    """Run the command line (what ``python -m seqedit.cli`` does)."""
    app()
