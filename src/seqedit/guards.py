"""The input checks both doors run, the CLI (``cli/preflight``, before the model loads) and the Python API
(:class:`~seqedit.Editor`, :func:`~seqedit.load_facts`), so one bad input gets one message wherever it
comes in. Each check reads nothing but its arguments (and a ledger's manifest, read-only), writes
nothing, and raises a :class:`~seqedit.errors.SeqEditError` subclass naming the problem:

- :func:`check_batch` — a step's facts: ``Fact`` objects, none twice (same id, or same slot and target);
- :func:`check_token_lengths` / :func:`check_fit` — texts longer than a limit or the model's context;
- :func:`check_visible` — texts with no visible character (a ``Fact``'s own fields: ``Fact.__post_init__``);
- :func:`ledger_settings` / :func:`check_reopen` — method, alignment, options, objective hyperparameters
  and prompt format that disagree with an existing ledger's manifest (``check_reopen``: also its lock);
- :func:`check_editor_args` / :func:`check_overrides` — the Editor's mode, prompt format, ledger path and
  hyperparameter overrides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .errors import FactError, SeqEditError
from .facts import Fact, check_distinct, visible

__all__ = ["InputError", "LedgerSettings", "check_batch", "check_editor_args", "check_fit", "check_mode",
           "check_overrides", "check_path", "check_reopen", "check_token_lengths", "check_visible", "context_length",
           "editor_options", "fact_texts", "ledger_settings"]


class InputError(SeqEditError, ValueError):
    """An input is unusable (named in the message): a prompt, a text too long, an option."""


def check_visible(texts: Sequence[str], what: str = "prompt") -> None:
    """Every text must show at least one character (``what`` names them in the message, 1-based)."""
    for i, p in enumerate(texts, start=1):
        if not isinstance(p, str):
            raise InputError(f"{what} {i} must be a string, got {type(p).__name__}")
        if not visible(p):
            raise InputError(f"{what} {i} ({p!r}) has no visible character")


def check_path(path: Any, what: str) -> None:
    """``path`` must be a ``str`` or ``os.PathLike`` naming something (``TypeError``/``InputError`` naming ``what``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    if not str(os.fspath(path)).strip() or "\0" in str(os.fspath(path)):
        raise InputError(f"{what} {str(path)!r} is not a usable path")


def check_mode(mode: Any, modes: Sequence[str]) -> None:
    if not isinstance(mode, str) or mode not in modes:
        raise InputError(f"unknown mode {mode!r}; expected one of {', '.join(modes)}")


def check_editor_args(modes: Sequence[str], mode: Any, prompt_format: Any, ledger: Any) -> None:
    """The Editor's arguments that need no model: ``mode``, ``prompt_format``, the ``ledger`` path."""
    from .locate.chat import check_prompt_format

    check_mode(mode, modes)
    if prompt_format is not None:
        check_prompt_format(prompt_format)
    if ledger is not None:
        check_path(ledger, "ledger")


def check_lam_growth(hparams: Any, spec: Any) -> None:
    """A λ schedule (``hparams.lam_growth``) needs a form that re-forms its system exactly (memit/aligned,
    rlsedit): the others' weights are not one accumulated system's optimum."""
    if not hparams.lam_growth:
        return
    if spec.name not in ("memit", "rlsedit") or not spec.capabilities.matches_one_time:
        raise InputError(f"lam_growth needs a form whose weights are the optimum of one accumulated system "
                         f"(memit/aligned, rlsedit), not {spec.label}")


def check_batch(facts: Iterable[Any], where: str = "facts", allow_empty: bool = False,
                distinct: bool = True) -> list[Fact]:
    """``facts`` as a list of :class:`Fact`, refused when empty (unless ``allow_empty``), when an item
    is no ``Fact`` (``TypeError``) or when one edit comes twice (:func:`~seqedit.facts.check_distinct`)."""
    if isinstance(facts, (str, bytes, Fact, Mapping)):
        raise TypeError(f"{where} must be a sequence of seqedit.Fact, got {type(facts).__name__}")
    try:
        facts = list(facts)
    except TypeError:
        raise TypeError(f"{where} must be a sequence of seqedit.Fact, got {type(facts).__name__}") from None
    if not facts and not allow_empty:
        raise FactError(f"{where}: a step needs at least one fact")
    for f in facts:
        if not isinstance(f, Fact):
            raise TypeError(f"{where}: expected seqedit.Fact, got {type(f).__name__}")
    if distinct:
        check_distinct(facts, where)
    return facts


def context_length(config: Any) -> Optional[int]:
    """The model's context in tokens (``max_position_embeddings``), if its config says."""
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def fact_texts(facts: Sequence[Fact]) -> list[tuple[str, str]]:
    """``(label, text)`` per fact as the length check measures it: the filled prompt, a space, the target."""
    return [(f"fact {f.id or i}", f"{f.text} {f.target}") for i, f in enumerate(facts, 1)]


def check_fit(loaded: Any, facts: Sequence[Fact]) -> None:
    """Each fact (:func:`fact_texts`) must fit the context of ``loaded`` (a ``LoadedModel``)."""
    check_token_lengths(loaded.name, loaded.tokenizer, getattr(loaded.model, "config", None), fact_texts(facts))


def check_token_lengths(name: str, tokenizer: Any, config: Any, texts: Sequence[tuple[str, str]],
                        max_tokens: Optional[int] = None, extra: int = 0) -> None:
    """Each ``(label, text)`` must fit ``max_tokens`` (if given) and, with ``extra`` tokens to generate,
    the model's context. A runaway prompt would otherwise run for minutes and gigabytes before
    failing, or never."""
    context = context_length(config)
    limits = [x for x in (max_tokens, None if context is None else context - extra) if x is not None]
    if not limits:
        return
    limit = min(limits)
    if limit < 1:
        raise InputError(f"{name}: a context of {context} tokens leaves no room for {extra} new tokens")
    for label, text in texts:
        if len(text) <= limit:  # a token spans at least one character
            continue
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > limit:
            why = ("--max-prompt-tokens" if limit == max_tokens else
                   f"the model's context of {context} tokens" + (f" minus {extra} to generate" if extra else ""))
            raise InputError(f"{label} is {n} tokens long; the limit is {limit} ({why})")


@dataclass(frozen=True)
class LedgerSettings:
    """What an existing ledger is continued with: ``requested`` (the method asked for, ``None``: the
    stored one), ``spec`` (the stored method), ``hparams`` and ``prompt_format``."""

    requested: Any
    spec: Any
    hparams: Any
    prompt_format: str


def ledger_settings(man: dict, path: Any, *, method: Optional[str] = None, alignment: Optional[str] = None,
                    options: Optional[dict[str, Any]] = None, hparams: Any = None,
                    overrides: Optional[dict[str, Any]] = None, prompt_format: Optional[str] = None,
                    mix_prompt_formats: bool = False) -> LedgerSettings:
    """Refuse a method, alignment, method options, objective hyperparameters (``layers``, ``lam``) or
    a prompt format that disagree with the ledger whose manifest is ``man`` (``LedgerError``). Needs no
    model: the base model's identity is checked once it is loaded (``ledger.manifest.reconcile``)."""
    from .ledger.manifest import reconcile_prompt_format, reconcile_settings, requested_method
    from .locate.chat import check_prompt_format

    for what, value in (("method", method), ("alignment", alignment)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InputError(f"{what} must be a non-empty string, got {value!r}")
    if prompt_format is not None:
        check_prompt_format(prompt_format)
    requested = requested_method(man, method, alignment, dict(options or {}))
    spec, hp = reconcile_settings(man, requested, hparams, dict(overrides or {}), path)
    fmt = reconcile_prompt_format(man, prompt_format, mix_prompt_formats, path)
    return LedgerSettings(requested, spec, hp, fmt)


# Editor.from_ledger's keyword arguments that are the constructor's own, not method options
_CONSTRUCTOR_ARGS = frozenset({"tokenizer", "method", "mode", "alignment", "method_options", "hparams", "preset",
                               "stats_corpus", "ledger", "kv_dtype", "snapshot_every", "callbacks", "solve_device",
                               "prompt_format", "mix_prompt_formats"})


def editor_options(method_options: Optional[dict], overrides: dict[str, Any]) -> tuple[dict, dict]:
    """The Editor's keyword overrides as ``(method options, hyperparameter overrides)``: a name that is a
    hyperparameter field overrides it, any other (not ``None``) is an option of the method form."""
    from .models.presets import EditHParams

    if method_options is not None and not isinstance(method_options, dict):
        raise TypeError(f"method_options must be a dict, got {type(method_options).__name__}")
    fields = set(EditHParams.__dataclass_fields__)
    check_overrides({k: v for k, v in overrides.items() if k in fields})
    options = {**(method_options or {}), **{k: v for k, v in overrides.items()
                                            if k not in fields and k not in _CONSTRUCTOR_ARGS and v is not None}}
    return options, {k: v for k, v in overrides.items() if k in fields}


# int fields that may be 0 (no context templates; a seed); every other int field counts something, >= 1
_MAY_BE_ZERO = frozenset({"n_context_templates", "template_seed", "lam_growth"})


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Each hyperparameter override has its field's type and a usable value (``InputError`` naming the
    field): ``layers`` a sequence of ints, counts ints ≥ 1, weights finite reals ≥ 0, and so on. The
    dataclass itself checks only some fields, and a string where a number goes fails later, unnamed."""
    import math
    import numbers
    from dataclasses import fields

    from .models.presets import EditHParams

    kinds = {f.name: str(f.type) for f in fields(EditHParams)}
    for name, v in overrides.items():
        kind = kinds.get(name)
        if v is None or kind is None:
            continue
        integral = isinstance(v, numbers.Integral) and not isinstance(v, bool)
        if name == "layers":
            ok = isinstance(v, (tuple, list, range)) and all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                                                              for x in v)
            want = "a sequence of ints"
        elif kind == "int":
            ok, want = integral and v >= (0 if name in _MAY_BE_ZERO else 1), "an int ≥ " + ("0" if name in _MAY_BE_ZERO else "1")
        elif kind == "float":
            ok = integral or isinstance(v, numbers.Real) and not isinstance(v, bool)
            if name == "early_stop_loss":  # a negative loss never stops the optimisation early: allowed
                ok, want = ok and not math.isnan(v), "a number"
            else:
                ok, want = ok and math.isfinite(v) and v >= 0, "a finite number ≥ 0"
        elif kind == "bool":
            ok, want = isinstance(v, bool), "true or false"
        elif kind == "str":
            ok, want = isinstance(v, str), "a string"
        else:
            ok, want = True, kind
        if not ok:
            raise InputError(f"hyperparameter {name} takes {want}, got {v!r:.80}")


def check_reopen(path: Any, modes: Sequence[str], kwargs: dict[str, Any]) -> None:
    """What ``Editor.from_ledger(path, **kwargs)`` would refuse once the model is loaded, refused before:
    no ledger at ``path``, its writer lock taken or journal damaged, a mode, method, options, objective
    or prompt format that disagree with it."""
    from .ledger import Ledger
    from .ledger.directory import check_writable

    check_path(path, "path")
    check_mode(kwargs.get("mode", "sequential"), modes)
    check_writable(path)
    with Ledger(path) as L:
        man = L.manifest
    options, overrides = editor_options(kwargs.get("method_options"), kwargs)
    ledger_settings(man, path, method=kwargs.get("method"), alignment=kwargs.get("alignment"), options=options,
                    hparams=kwargs.get("hparams"), overrides=overrides, prompt_format=kwargs.get("prompt_format"),
                    mix_prompt_formats=kwargs.get("mix_prompt_formats", False))
