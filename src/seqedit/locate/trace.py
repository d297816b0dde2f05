"""Forward hooks: read module inputs / block outputs, and stop a forward pass early."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to abandon the rest of a forward pass (layers above it are not needed)."""


def block_hidden(output):
    """The hidden-state tensor of a decoder block's output (a tensor, or a tuple led by it)."""
    return output[0] if isinstance(output, tuple) else output


def replace_block_hidden(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_inputs(module: nn.Module, fn: Callable[[torch.Tensor], None]):
    """Call ``fn(x)`` with the first positional (or ``hidden_states``) input of ``module``."""

    def pre_hook(_mod, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
        fn(x)

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def stop_after(module: nn.Module):
    """Abandon the forward pass right after ``module`` ran."""

    def hook(_mod, _args, _out):
        raise StopForward

    return module.register_forward_hook(hook)


def run_truncated(model: nn.Module, **inputs) -> None:
    """Run ``model(**inputs)`` without caching, swallowing the :class:`StopForward` of a stop hook."""
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except StopForward:
        pass
