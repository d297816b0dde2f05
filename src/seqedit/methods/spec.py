"""``MethodSpec``: one registered method, one of its alignments and that form's options, validated.

``parse_method("memit", "aligned", ridge=0.5)`` or ``MethodSpec("memit", "aligned", ridge=0.5)``; the
options a form accepts and their defaults come from the registry (:mod:`seqedit.methods.registry`).
A spec is immutable, hashable, and round-trips through ``to_dict`` / ``MethodSpec.from_dict``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .registry import (
    Capabilities,
    Form,
    MethodInfo,
    canonical,
    forms_accepting,
    method_info,
)
from .tensors import as64

__all__ = ["MethodSpec", "parse_method"]

# Before the registry, a spec serialised every option of every method with these defaults; stored
# specs (ledger manifests, method states) may still hold them.
_LEGACY_DEFAULTS = {"ridge": None, "mu2": 1.0, "threshold": 2e-2, "alpha": 10.0, "top_percent": 20.0,
                    "reproduce_official_prune": False}


class MethodSpec:
    """``name`` + ``alignment`` + the form's options (every accepted option, defaults filled in).

    Options are read as attributes (``spec.ridge``) or as the mapping ``spec.options``. ``None`` given
    for an option means its default. Raises ``ValueError`` naming the problem: an unknown method or
    alignment, an option the form does not accept, or a bad value.
    """

    __slots__ = ("name", "alignment", "_options")

    def __init__(self, name: str, alignment: str | None = None, **options: Any) -> None:
        info = method_info(name)
        al = info.default_alignment if alignment is None else str(alignment).strip().lower()
        form = info.form(al)
        resolved: dict[str, Any] = {}
        for key in options:
            if key not in form.options:
                raise ValueError(_absent(info, al, form, key))
        for key, default in form.options.items():
            opt = info.options[key]
            value = options.get(key)
            if value is None:
                value = opt.default if default is None else default
            resolved[key] = opt.check(value)
        object.__setattr__(self, "name", info.name)
        object.__setattr__(self, "alignment", al)
        object.__setattr__(self, "_options", tuple(sorted(resolved.items())))

    # ------------------------------------------------------------------ value semantics
    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("MethodSpec is immutable")

    def __getattr__(self, key: str) -> Any:
        for k, v in object.__getattribute__(self, "_options"):
            if k == key:
                return v
        raise AttributeError(f"{type(self).__name__} {self.label} has no option {key!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodSpec) and (self.name, self.alignment, self._options) == (
            other.name, other.alignment, other._options)

    def __hash__(self) -> int:
        return hash((self.name, self.alignment, self._options))

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self._options)
        return f"MethodSpec({self.name!r}, {self.alignment!r}{opts})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.to_dict(),))

    # ------------------------------------------------------------------ registry facts
    @property
    def label(self) -> str:
        return f"{self.name}/{self.alignment}"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._options)

    @property
    def info(self) -> MethodInfo:
        return method_info(self.name)

    @property
    def form(self) -> Form:
        return self.info.form(self.alignment)

    @property
    def capabilities(self) -> Capabilities:
        return self.form.capabilities

    @property
    def matches_one_time(self) -> bool:
        """True for the forms whose sequential steps reproduce the one-time solution of all batches
        (``W + raw`` before R_p for prune/rect); the naive, uncorrected and memorize_latest forms are
        controls that do not."""
        return self.capabilities.matches_one_time

    @property
    def post_processed(self) -> bool:
        """True for prune and rect: the deployed update differs from the solved one."""
        return self.capabilities.post_processed

    @property
    def effective_ridge(self) -> float:
        """The ridge ρ of ``A = λΣ₀ + ρI + Σ kkᵀ`` (0 for forms without one, e.g. AlphaEdit's)."""
        return float(dict(self._options).get("ridge") or 0.0)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe ``{"name", "alignment", **options}``; ``MethodSpec(**d)`` rebuilds the spec."""
        return {"name": self.name, "alignment": self.alignment, **dict(self._options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodSpec:
        """Rebuild a stored spec, accepting the pre-registry layout (every option of every method,
        those a form does not use at their old defaults)."""
        data = dict(data)
        try:
            name, alignment = data.pop("name"), data.pop("alignment")
        except KeyError as e:
            raise ValueError(f"stored method spec lacks {e.args[0]!r}: {data}") from None
        form = method_info(name).form(str(alignment))
        for key in [k for k in data if k not in form.options]:
            if key in _LEGACY_DEFAULTS and data[key] == _LEGACY_DEFAULTS[key]:
                del data[key]
        return cls(name, alignment, **data)

    def init_layer(self, sigma0: Tensor, lam: float, W0: Tensor):
        """The state of one edited layer: ``sigma0: [d_in, d_in]`` (symmetric PSD), ``lam ≥ 0``,
        ``W0: [d_out, d_in]`` the pre-edit weight. Raises ``ValueError`` on bad shapes/values and
        ``IllConditionedError`` if the method's system is singular (e.g. ``lam = 0`` without a ridge)."""
        W0 = as64(W0, "W0")
        if not isinstance(sigma0, Tensor) or sigma0.ndim != 2 or sigma0.shape[0] != W0.shape[1]:
            got = tuple(sigma0.shape) if isinstance(sigma0, Tensor) else type(sigma0).__name__
            raise ValueError(f"sigma0 must be a tensor [{W0.shape[1]}, {W0.shape[1]}] (d_in of W0), got {got}")
        return self.form.state.create(self, sigma0, float(lam), W0)


def _rebuild(data: dict[str, Any]) -> MethodSpec:
    return MethodSpec.from_dict(data)


def _absent(info: MethodInfo, alignment: str, form: Form, key: str) -> str:
    label = f"{info.name}/{alignment}"
    where = forms_accepting(key)
    if not where:
        valid = ", ".join(form.options) or "none"
        return f"unknown option {key!r} for {label}; valid options: {valid}"
    hint = form.hints.get(key)
    return f"{label} has no {key}" + (f": {hint}" if hint else "") + f"; {key} applies only to {', '.join(where)}"


def parse_method(name: str, alignment: str | None = None, **options: Any) -> MethodSpec:
    """``MethodSpec`` for ``name`` (case-insensitive, ``-`` = ``_``) and ``alignment`` (default: the
    method's first); ``options`` are the form's options. Raises ``ValueError`` listing the valid
    combinations or options."""
    return MethodSpec(canonical(name), alignment, **options)
