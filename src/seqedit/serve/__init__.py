"""``seqedit serve``: an HTTP service that keeps a deployed model's facts current (``docs/serve.md``).

``config`` (settings, tokens), ``auth`` (bearer scopes), ``edit_queue`` (durable SQLite queue),
``worker`` (the one thread owning the editor: batches, forget/undo/verify/export jobs),
``weights_lock`` (completions never see half a step), ``generate`` (OpenAI-style completions),
``schemas`` (pydantic bodies), ``routes`` (the ledger side of ``/v1``), ``completions`` (the OpenAI side), ``page`` (the HTML page at ``/``),
``errors``, ``middleware``, ``logs``, and ``app`` (:func:`create_app`). A front end, like ``seqedit.cli``:
it uses the public :class:`~seqedit.Editor` and ledger API only.
"""

from .app import create_app
from .config import ServeConfig, ServeConfigError, TokenTable, read_token_file

__all__ = ["ServeConfig", "ServeConfigError", "TokenTable", "create_app", "read_token_file"]
