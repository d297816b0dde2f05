"""``python -m seqedit.cli``: the same command line as the ``seqedit`` script."""

from . import main

main()
