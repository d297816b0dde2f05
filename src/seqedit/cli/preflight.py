"""Checks of a command's inputs that need no model weights, run before the model loads (minutes on a 7B
model): options, the model's config, the ledger's lock, and whether the ledger's method and objective
agree with the options given. Each raises a :class:`~seqedit.errors.SeqEditError` or ``ValueError``
that the CLI prints as one ``error:`` line; none writes anything.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import Any, Optional

from ..guards import InputError, check_token_lengths, check_visible, context_length, ledger_settings

__all__ = ["check_edit", "check_ledger", "check_new_dir", "check_prompt_tokens", "check_prompts", "context_length"]


def check_prompts(prompts: list[str], what: str = "prompt") -> None:
    """Every prompt must show at least one character (:func:`seqedit.guards.check_visible`)."""
    check_visible(prompts, what)


def check_new_dir(path: Path, what: str) -> None:
    """``path`` may become a new directory: it does not exist, or is an empty directory."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{what} {path} exists and is not an empty directory; choose another path")


def _n_layers(model: str) -> tuple[str, Optional[int]]:
    from ..models.load import model_config

    name, config = model_config(model)
    n = getattr(config, "num_hidden_layers", None)
    return name, n if isinstance(n, int) else None


def check_edit(model: str, method: Optional[str], alignment: Optional[str], mode: str, layers: Optional[tuple[int, ...]],
               lam: Optional[float], v_steps: Optional[int], ledger: Optional[Path], save: Optional[Path],
               prompt_format: Optional[str] = None, mix_prompt_formats: bool = False,
               preset: Optional[str] = None) -> None:
    """What ``seqedit edit`` would refuse after loading the model, refused before."""
    from ..editor import DEFAULT_METHOD, MODES
    from ..ledger import Ledger
    from ..ledger.directory import check_writable
    from ..ledger.session import check_journalable
    from ..locate.chat import check_prompt_format
    from ..methods import parse_method
    from ..models.presets import check_variant, preset_for

    for flag, value in (("--method", method), ("--alignment", alignment)):
        if value is not None and not value.strip():
            raise InputError(f"{flag} is empty")
    if mode not in MODES:
        raise InputError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if prompt_format is not None:
        check_prompt_format(prompt_format)
    if save is not None and save.exists() and not save.is_dir():
        raise InputError(f"--save {save} is a file; give a directory")
    overrides: dict[str, Any] = {k: v for k, v in {"layers": layers, "lam": lam, "v_steps": v_steps}.items()
                                 if v is not None}
    name, n_layers = _n_layers(model)
    try:
        check_variant(name, preset)
    except ValueError as e:
        raise InputError(f"--preset: {e}") from None
    if ledger is not None:
        check_writable(ledger)
    if ledger is not None and Ledger.exists(ledger):
        with Ledger(ledger) as L:
            wanted = preset_for(name, n_layers, preset) if preset is not None and n_layers else None
            hp = ledger_settings(L.manifest, ledger, method=method, alignment=alignment, hparams=wanted,
                                 overrides=overrides, prompt_format=prompt_format,
                                 mix_prompt_formats=mix_prompt_formats).hparams
    else:
        spec = parse_method(method or DEFAULT_METHOD, alignment)
        if ledger is not None:
            check_journalable(spec)
        hp = preset_for(name, n_layers, preset).override(**overrides) if n_layers else None
    if hp is not None and n_layers is not None:
        if bad := [l for l in hp.layers if not 0 <= l < n_layers]:
            raise InputError(f"--layers {','.join(map(str, bad))}: {name} has {n_layers} layers (0–{n_layers - 1})")


def check_prompt_tokens(model: str, texts: Sequence[tuple[str, str]], max_tokens: int, extra: int = 0) -> None:
    """Each ``(label, text)`` must fit ``max_tokens`` and, with ``extra`` tokens to generate, the
    model's context (only the tokenizer and config are read). A runaway prompt would otherwise run
    for minutes and gigabytes before failing, or never."""
    from ..models.load import model_config, model_tokenizer

    name, config = model_config(model)
    check_token_lengths(name, model_tokenizer(model), config, texts, max_tokens, extra)


def check_ledger(ledger: Path, *, write: bool) -> dict:
    """The manifest of the ledger at ``ledger`` (opened read-only); with ``write``, the writer lock must be free."""
    from ..ledger import Ledger
    from ..ledger.directory import check_writable

    with Ledger(ledger) as L:
        man = L.manifest
    if write:
        check_writable(ledger)
    return man
