"""The machinery of results.json's schema (:mod:`.schema`): a frozen dataclass read from parsed JSON
with validation and written back exactly.

A :class:`Record` subclass declares one field per JSON key, typed with ``str``, ``int``, ``float``,
``bool``, ``Any`` (a free-form JSON value), another record, ``tuple[X, ...]`` (a JSON list),
``Mapping[str, X]`` (a JSON object keyed by a label, task or layer) or ``X | None``. A field without
a default is required; :func:`opt` fields are ``None`` when absent; :func:`many` and :func:`table`
fields are empty when absent and always written.

``to_dict(from_dict(d)) == d``, in ``d``'s key order: unknown keys are kept in ``extra`` and written
back, ``_flip`` remembers where a ``None`` or empty default was spelt the other way than the writer
spells it (absent where the writer writes ``null`` or ``[]``, ``null`` where it leaves the key out)
and ``_order`` the keys' order. A results folder resumed by a later seqedit is thus rewritten with
only what the run adds (a committed file's diff stays readable), while an object built in code gets
the keys the runner has always written, in its fields' order.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

from .config import EvalSettingsError

__all__ = ["Record", "ResultsFileError", "many", "opt", "table"]

R = TypeVar("R", bound="Record")


class ResultsFileError(EvalSettingsError):
    """A results.json that does not fit the schema; the message names the file and the key path."""


class _Bad(Exception):
    def __init__(self, at: str, problem: str):
        super().__init__(f"{at or 'the top level'}: {problem}")


def opt(null: bool = False) -> Any:
    """An optional field (``None`` when absent); ``null``: the writer writes ``None`` as JSON null."""
    return field(default=None, metadata={"null": null})


def many() -> Any:
    """A list field that is always written (``[]`` when empty)."""
    return field(default=())


def table() -> Any:
    """A mapping field that is always written (``{}`` when empty)."""
    return field(default_factory=dict)


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _shown(v: Any) -> str:
    return "null" if v is None else f"{v!r} ({type(v).__name__})" if len(repr(v)) < 60 else type(v).__name__


def _value(tp: Any, v: Any, at: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return copy.deepcopy(v)  # a free-form blob (hyperparameters, overrides): the caller's copy stays its own
    if origin in (Union, types.UnionType):
        if v is None:
            return None
        return _value(next(a for a in typing.get_args(tp) if a is not type(None)), v, at)
    if origin is tuple:
        if not isinstance(v, list):
            raise _Bad(at, f"expected a list, got {_shown(v)}")
        item = typing.get_args(tp)[0]
        return tuple(_value(item, x, f"{at}[{i}]") for i, x in enumerate(v))
    if origin is Mapping:
        if not isinstance(v, dict):
            raise _Bad(at, f"expected an object, got {_shown(v)}")
        item = typing.get_args(tp)[1]
        return {k: _value(item, x, f"{at}[{k!r}]") for k, x in v.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp._parse(v, at)
    # bool is an int to Python, never to JSON; an integer is a number (0 seconds is written as 0)
    ok = (isinstance(v, (int, float)) if tp is float else isinstance(v, tp)) and (tp is bool or not isinstance(v, bool))
    if not ok:
        raise _Bad(at, f"expected {_KINDS[tp]}, got {_shown(v)}")
    return v


def _dump(v: Any) -> Any:
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, (tuple, list)):
        return [_dump(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _dump(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class _Field:
    name: str
    type: Any
    required: bool
    default: Any
    null: bool

    def written(self, value: Any) -> bool:
        """Whether the writer writes this key for ``value`` (before any ``_flip``)."""
        return value is not None or self.null


@functools.cache
def _fields(cls: type) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in ("extra", "_flip", "_order"):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        null = f.metadata.get("null", False)
        out.append(_Field(f.name, hints[f.name], required, None if required else default, null))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Record:
    """Base of every schema class: validated reading (:meth:`from_dict`), exact writing (:meth:`to_dict`).

    ``extra`` holds the keys the schema does not know (written back unchanged); ``_flip`` the keys
    whose ``None`` or empty default is spelt the other way than the writer spells it; ``_order`` the
    keys' order as read (none for a record built in code: its fields' order).
    """

    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    _flip: frozenset[str] = field(default=frozenset(), repr=False)
    _order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_dict(cls: type[R], d: Any, source: str | Path | None = None, at: str = "") -> R:
        """``d`` (parsed JSON) as this class; raises :class:`ResultsFileError` naming ``source`` (the
        file, default ``results.json``) and the key path (below ``at``) of the first key that is
        missing or of the wrong type."""
        try:
            return cls._parse(d, at)
        except _Bad as e:
            raise ResultsFileError(f"{source or 'results.json'}: {e}") from None

    @classmethod
    def _parse(cls: type[R], d: Any, at: str) -> R:
        if not isinstance(d, dict):
            raise _Bad(at, f"expected an object, got {_shown(d)}")
        kw: dict[str, Any] = {}
        flip = set()
        for f in _fields(cls):
            if f.name not in d:
                if f.required:
                    raise _Bad(at, f"missing required key {f.name!r}")
                if f.written(f.default):
                    flip.add(f.name)
                continue
            kw[f.name] = _value(f.type, d[f.name], f"{at}.{f.name}" if at else f.name)
            if d[f.name] is None and not f.written(None):
                flip.add(f.name)
        names = {f.name for f in _fields(cls)}
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in names}
        return cls(**kw, extra=extra, _flip=frozenset(flip), _order=tuple(d))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this record: its fields as the writer writes them, then ``extra``."""
        out: dict[str, Any] = {}
        for f in _fields(type(self)):
            value = getattr(self, f.name)
            # a flip is about how a missing value was spelt: a value set since is written as any other
            flipped = f.name in self._flip and value == f.default
            if f.written(value) != flipped:
                out[f.name] = _dump(value)
        out.update(_dump(self.extra))
        if not self._order:
            return out
        ordered = {k: out[k] for k in self._order if k in out}
        return ordered | out  # keys that were not there before go last

    def metric(self, name: str) -> Any:
        """The field ``name`` (a metric chosen by name, e.g. from a dataset's metric list); a name this
        record does not have raises ``KeyError`` instead of reading as a missing value."""
        if name not in {f.name for f in _fields(type(self))}:
            raise KeyError(f"{type(self).__name__} has no field {name!r}")
        return getattr(self, name)

    def recast(self, target: type[R], **more: Any) -> R:
        """This record as ``target``, a subclass adding the fields ``more`` (written first, in their order),
        its own keys spelt and ordered as they were."""
        own = {f.name: getattr(self, f.name) for f in _fields(type(self))}
        order = (*more, *self._order) if self._order else ()
        return target(**own, **more, extra=self.extra, _flip=self._flip, _order=order)
