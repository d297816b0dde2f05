"""Exceptions raised by seqedit. Every message names the offending input and the problem."""

from __future__ import annotations


class SeqEditError(Exception):
    """Base class of every error seqedit raises on purpose."""


class FactError(SeqEditError, ValueError):
    """A fact (or a record of a fact file) is malformed: missing subject, empty target, ..."""


class UnsupportedArchitectureError(SeqEditError, ValueError):
    """The model's ``config.model_type`` has no architecture adapter."""


class ModelLoadError(SeqEditError, RuntimeError):
    """A model or tokenizer could not be loaded (missing file, missing package, ...)."""


class IllConditionedError(SeqEditError, ArithmeticError):
    """A normal-equation system is singular or too ill-conditioned to solve reliably."""


class LocateError(SeqEditError, ValueError):
    """Keys or values could not be located (subject not found among the tokens, ...)."""


class PlacementError(SeqEditError, RuntimeError):
    """A tensor cannot be used where it lives: quantized, offloaded without writeback, or too large to fit."""
