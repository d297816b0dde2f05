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


class LowerBlocksReplay:
    """Skips blocks ``0..top`` in later passes over the same rows: their output there is fixed.

    The first pass records block ``top``'s output (:meth:`record`); inside :meth:`skipping`, blocks below
    ``top`` pass their input through untouched and block ``top`` returns the recorded output, so only
    the blocks above do work (hooks on block ``top`` still run). :meth:`select` keeps a subset of rows.
    """

    def __init__(self, adapter, top: int):
        self.blocks = [adapter.block(i) for i in range(top + 1)]
        self.out = None  # block top's output structure from the recording pass
        self.hidden: torch.Tensor | None = None

    def record(self, out) -> None:
        self.out = out
        self.hidden = block_hidden(out).detach()

    def recorder(self):
        """A forward hook for block ``top`` that records its output (registered by the caller)."""

        def hook(_m, _a, out):
            if self.hidden is None:
                self.record(out)

        return hook

    def select(self, index: torch.Tensor) -> None:
        self.hidden = self.hidden[index.to(self.hidden.device)]

    @contextmanager
    def skipping(self) -> Iterator[None]:
        if self.hidden is None:
            yield
            return
        *lower, top = self.blocks

        def passthrough(*args, **kwargs):
            return replace_block_hidden(self.out, args[0] if args else kwargs["hidden_states"])

        def recorded(*args, **kwargs):
            return replace_block_hidden(self.out, self.hidden)

        with shadow_forward(lower, passthrough), shadow_forward([top], recorded):
            yield


@contextmanager
def shadow_forward(modules: list[nn.Module], forward: Callable) -> Iterator[None]:
    """Run ``forward`` instead of each module's own for the duration, then put back exactly what was there.

    A module's ``forward`` may be an instance attribute (accelerate's device-alignment or offload hook
    installs one, and so may other libraries): it is saved and restored, never deleted, so the hooks
    still run afterwards. Skipped blocks run no hook at all, which is what a skip wants: an offloaded
    block would otherwise load its weights only to pass its input through.
    """
    with shadow_forwards([(m, forward) for m in modules]):
        yield


@contextmanager
def shadow_forwards(pairs: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """:func:`shadow_forward` with a forward of its own for each module."""
    saved = [m.__dict__.get("forward") for m, _ in pairs]
    for m, forward in pairs:
        m.forward = forward
    try:
        yield
    finally:
        for (m, _), own in zip(pairs, saved):
            if own is None:
                del m.forward  # ours: the class's forward shows through again
            else:
                m.forward = own


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient here; freezing them keeps autograd from saving or computing any."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
