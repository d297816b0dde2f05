"""What one ``seqedit serve`` process is configured with: the ledger and model, batching, limits,
the export root and the API tokens. Pure data and its checks; nothing here touches the model."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SeqEditError

__all__ = ["ServeConfig", "ServeConfigError", "TokenTable", "is_loopback", "read_token_file"]

TOKEN_ENV = "SEQEDIT_API_TOKEN"
SCOPES = ("read", "write")


class ServeConfigError(SeqEditError, ValueError):
    """The service cannot start with this configuration (bad token file, public address without a token, ...)."""


@dataclass(frozen=True)
class TokenTable:
    """API tokens by scope. ``write`` tokens may also read. Empty: the API is open (loopback only)."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.read or self.write)


def read_token_file(path: str | os.PathLike, env: str | None = None) -> TokenTable:
    """Tokens from ``path`` (lines ``read TOKEN`` or ``write TOKEN``; ``#`` comments and blank lines
    skipped) plus ``env`` (the value of ``SEQEDIT_API_TOKEN``) as one write token."""
    read: list[str] = []
    write: list[str] = [env.strip()] if env and env.strip() else []
    if path is not None:
        try:
            lines = Path(path).read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ServeConfigError(f"token file {path}: cannot read it ({e})") from None
        for n, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] not in SCOPES:
                raise ServeConfigError(f"token file {path} line {n}: expected 'read TOKEN' or 'write TOKEN'")
            if len(parts[1]) < 16:
                raise ServeConfigError(f"token file {path} line {n}: a token needs at least 16 characters")
            (read if parts[0] == "read" else write).append(parts[1])
    return TokenTable(tuple(read), tuple(write))


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """Settings of the service. ``editor_options`` go to :class:`~seqedit.Editor` (``method``,
    ``layers``, ``lam``, ``v_steps``, ...; ``None`` values are dropped). Limits bound what one request
    may ask for, so no client can exhaust memory or hold the worker."""

    ledger: Path
    model: str | None = None  # None: the base model the ledger records
    dtype: str | None = None  # None: the dtype the ledger records (its base fingerprint includes it), else float32
    device_map: str | dict | None = None  # load_model's; None: the first GPU, else the CPU
    editor_options: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: TokenTable = field(default_factory=TokenTable)
    export_root: Path | None = None
    max_batch: int = 64
    max_wait_s: float = 0.5
    max_body_bytes: int = 1 << 20
    max_facts_per_request: int = 256
    max_tokens: int = 256  # per completion
    max_n: int = 8
    max_prompts: int = 16
    page_size_limit: int = 1000
    verify_on_start: bool = True
    job_timeout_s: float = 600.0
    max_queue: int = 10_000  # queued edits; a submission over it answers 429
    max_jobs: int = 64  # forget/undo/verify/export jobs waiting for the worker
    keep_applied_days: float | None = None  # None: applied queue entries are kept forever
    batch_rows: int = 16  # greedy prompts decoding together (serve/batching.py); 1: no batching
    batch_wait_s: float = 0.01  # how long a first request that finds others queued waits for company

    def __post_init__(self) -> None:
        self.ledger = Path(self.ledger)
        if self.export_root is not None:
            self.export_root = Path(self.export_root)
        if self.max_batch < 1 or self.max_wait_s < 0:
            raise ServeConfigError(f"--max-batch must be >= 1 and --max-wait-s >= 0, got {self.max_batch}, {self.max_wait_s}")
        if self.batch_rows < 1 or self.batch_wait_s < 0:
            raise ServeConfigError(f"--batch-rows must be >= 1 and the batch wait >= 0, got {self.batch_rows}, {self.batch_wait_s}")
        if self.max_queue < 1 or self.max_jobs < 1:
            raise ServeConfigError(f"--max-queue and the job limit must be >= 1, got {self.max_queue}, {self.max_jobs}")
        if self.keep_applied_days is not None and not self.keep_applied_days > 0:
            raise ServeConfigError(f"--keep-applied-days must be > 0, got {self.keep_applied_days}")
        if not 0 < self.port < 65536:
            raise ServeConfigError(f"--port must be in 1..65535, got {self.port}")
        if not self.tokens.enabled and not is_loopback(self.host):
            raise ServeConfigError(
                f"refusing to listen on {self.host} without an API token: give --token-file or {TOKEN_ENV}, "
                "or listen on 127.0.0.1"
            )

    @property
    def queue_path(self) -> Path:
        """The durable edit queue, inside the ledger directory (the ledger ignores files it does not name)."""
        return self.ledger / "serve-queue.sqlite"
