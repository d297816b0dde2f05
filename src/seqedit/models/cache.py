"""The KV cache as the installed transformers names it. Since transformers 5.x a model's forward takes
``cache=`` and returns ``output.cache``; ``past_key_values`` (in and out) still works but warns
(``FutureWarning`` / a logged deprecation) on every call. Every forward in seqedit that passes or
reads a cache goes through these two functions, so the name follows the installed version."""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = ["cache_arg", "returned_cache"]


@functools.lru_cache(maxsize=64)
def _name(forward: Any) -> str:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a builtin or C forward: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(module: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``module(**inputs, **cache_arg(module, cache))`` (``cache`` may be ``None``)."""
    return {_name(type(module).forward): cache}


def returned_cache(output: Any) -> Any:
    """The cache a forward returned (``None`` if none), read without touching a deprecated attribute."""
    if "cache" in getattr(output, "__dataclass_fields__", {}):
        return getattr(output, "cache", None)
    return getattr(output, "past_key_values", None)
