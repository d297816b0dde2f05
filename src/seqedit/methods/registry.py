"""The method registry: every editing method, its alignments (forms), options and capabilities.

A method is registered once with :func:`register_method`; everything else (``MethodSpec`` parsing,
the editor, the ledger's planning, the evaluation runner, the CLI) reads what a form can do from
here, so adding a method never means editing those modules::

    register_method("mymethod", {"aligned": Form(MyState, Capabilities(removal="system", exact=True,
                                                                      matches_one_time=True),
                                                 options={"ridge": None})},
                    options=[RIDGE])

``Form.options`` names the options a form accepts with their defaults (``None`` = the option's own
default); ``Option.check`` validates a given value. :data:`METHODS` is a live read-only view
``name → alignments`` (the first alignment is the default).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Literal

from seqedit.linalg.checks import real

__all__ = [
    "METHODS",
    "Capabilities",
    "Form",
    "MethodInfo",
    "Option",
    "float_option",
    "forms_accepting",
    "method_info",
    "register_method",
    "unregister_method",
]

Removal = Literal["system", "rebuild", "none"]


@dataclass(frozen=True)
class Capabilities:
    """What a form can do, read by the editor, the ledger and the evaluation runner.

    - ``removal``: ``"system"`` (the state's ``system.update(K_add, R_add, K_rem, R_rem)`` removes
      constraints exactly), ``"rebuild"`` (re-solve the facts in force from the base weights; they are
      at most one batch) or ``"none"``.
    - ``exact``: the weights are the one-time solution of the facts in force (``verify`` re-solves it).
    - ``latest_only``: every step replaces all facts in force (memorize_latest).
    - ``matches_one_time``: sequential steps reproduce the one-time solution of all batches (before
      post-processing for ``post_processed`` forms).
    - ``post_processed``: the deployed update differs from the solved one (PRUNE/RECT's R_p).
    - ``ote_same_as``: the alignment of the same method whose one-step (one-time) solve is identical to
      this form's, so an evaluation may reuse its numbers (naive MEMIT/AlphaEdit ≡ aligned in one step).
    - ``finalize``: the state has an end-of-run update (``LayerMethodState.finalize``); such a form
      cannot keep a ledger open, and ``Editor.finalize`` is only meaningful for it.
    """

    removal: Removal = "none"
    exact: bool = False
    latest_only: bool = False
    matches_one_time: bool = False
    post_processed: bool = False
    ote_same_as: str | None = None
    finalize: bool = False

    def __post_init__(self) -> None:
        if self.removal not in ("system", "rebuild", "none"):
            raise ValueError(f"removal must be 'system', 'rebuild' or 'none', got {self.removal!r}")


@dataclass(frozen=True)
class Option:
    """One method option: ``name``, its ``default`` and ``check(value) -> value`` (raises ``ValueError``)."""

    name: str
    default: Any
    check: Callable[[Any], Any]
    doc: str = ""


def float_option(name: str, default: float | None, doc: str = "", *, positive: bool = False,
                 upper: float | None = None) -> Option:
    """An option holding a finite real ``≥ 0`` (``> 0`` with ``positive``, ``≤ upper``) or ``None``."""

    def check(value: Any) -> Any:
        return None if value is None else real(value, name, positive=positive, upper=upper)

    return Option(name, default, check, doc)


@dataclass(frozen=True)
class Form:
    """One alignment of a method: its per-layer state class, capabilities and accepted options.

    ``state`` is a :class:`~seqedit.methods.state.LayerMethodState` subclass built with
    ``state.create(spec, sigma0, lam, W0)``. ``options`` maps each option name this form accepts to its
    default here (``None``: the option's own default). ``hint`` explains, in errors, why an option
    that the method has elsewhere is absent from this form.
    """

    state: type
    capabilities: Capabilities = field(default_factory=Capabilities)
    options: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""
    hints: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: ``name``, its forms by alignment (first = default) and option definitions."""

    name: str
    forms: Mapping[str, Form]
    options: Mapping[str, Option]
    doc: str = ""

    @property
    def alignments(self) -> tuple[str, ...]:
        return tuple(self.forms)

    @property
    def default_alignment(self) -> str:
        return next(iter(self.forms))

    def form(self, alignment: str) -> Form:
        if alignment not in self.forms:
            raise ValueError(
                f"method {self.name!r} has no alignment {alignment!r}; valid: {', '.join(self.forms)} "
                f"(all: {combinations()})"
            )
        return self.forms[alignment]


_REGISTRY: dict[str, MethodInfo] = {}


def canonical(name: Any) -> str:
    """``name`` as registered: case-insensitive, ``-`` = ``_``."""
    return str(name).strip().lower().replace("-", "_")


def register_method(name: str, forms: Mapping[str, Form] | Sequence[tuple[str, Form]], *,
                    options: Sequence[Option] = (), doc: str = "", replace: bool = False) -> MethodInfo:
    """Register method ``name`` with its ``forms`` (alignment → :class:`Form`, the first is the default)
    and the :class:`Option` definitions its forms use. Raises ``ValueError`` on a name already taken
    (unless ``replace``), an empty form list, or a form naming an undefined option."""
    key = canonical(name)
    if not key.isidentifier():
        raise ValueError(f"method name must be an identifier (letters, digits, _), got {name!r}")
    if key in _REGISTRY and not replace:
        raise ValueError(f"method {key!r} is already registered (pass replace=True to redefine it)")
    forms = dict(forms)
    if not forms:
        raise ValueError(f"method {key!r} needs at least one form (alignment)")
    opts = {o.name: o for o in options}
    for al, form in forms.items():
        if not isinstance(form, Form):
            raise TypeError(f"{key}/{al}: expected a seqedit.methods.Form, got {type(form).__name__}")
        if not isinstance(form.state, type) or not hasattr(form.state, "create"):
            raise TypeError(f"{key}/{al}: Form.state must be a LayerMethodState subclass")
        undefined = sorted(set(form.options) - set(opts))
        if undefined:
            raise ValueError(f"{key}/{al} names options {undefined} that the method does not define")
        same = form.capabilities.ote_same_as
        if same is not None and same not in forms:
            raise ValueError(f"{key}/{al}: ote_same_as={same!r} is not an alignment of {key}")
    info = MethodInfo(key, MappingProxyType(forms), MappingProxyType(opts), doc)
    _REGISTRY[key] = info
    return info


def unregister_method(name: str) -> None:
    """Remove a registered method (for tests and plugins that register temporarily)."""
    _REGISTRY.pop(canonical(name), None)


def combinations() -> str:
    return "; ".join(f"{n}: {', '.join(i.forms)}" for n, i in _REGISTRY.items())


def forms_accepting(option: str) -> list[str]:
    """Labels (``name/alignment``) of the registered forms that accept ``option``."""
    return [f"{n}/{a}" for n, i in _REGISTRY.items() for a, f in i.forms.items() if option in f.options]


def method_info(name: str) -> MethodInfo:
    """The registered method ``name``; ``ValueError`` listing the valid combinations otherwise."""
    key = canonical(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid (method: alignments): {combinations()}")
    return _REGISTRY[key]


class _Alignments(Mapping[str, tuple[str, ...]]):
    """Live read-only view ``method name → alignments`` of the registry."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return _REGISTRY[name].alignments

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"METHODS({dict(self)})"


METHODS: Mapping[str, tuple[str, ...]] = _Alignments()
"""Valid ``(name, alignment)`` combinations; the first alignment of each name is its default."""
