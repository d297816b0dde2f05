"""Per-model editing hyperparameters, in one place.

``preset_for(name, n_layers)`` returns an :class:`EditHParams`; every field can be overridden with
``dataclasses.replace`` or ``EditHParams.override(**kw)``. Values for the paper's models follow the
paper's Appendix B.4 and the public MEMIT/AlphaEdit JSONs (see ``../shared/docs/REFERENCE_NOTES.md`` §4);
the embedded model's from the long-run sweep recorded in ``docs/experiments/long-run-tuning.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence


COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "auto")
STOP_RULES = ("nll", "most_probable")
BUDGET_ANCHORS = ("current", "clean")
UPPER_BLOCK_MODES = ("auto", "modules", "fused", "compiled")


@dataclass(frozen=True)
class EditHParams:
    """Hyperparameters of one locate-and-edit method on one model.

    ``layers`` are the edited blocks in ascending order; the last one is the z-layer where target
    values are optimised. ``lam`` is the preservation weight λ of ``λ·Σ₀`` (MEMIT's
    ``mom2_update_weight``). The ridge ρ of ``ρ·I`` is an option of the method form
    (``MethodSpec.ridge``), since its default depends on the form.
    """

    layers: tuple[int, ...]
    lam: float = 15000.0
    # preservation that keeps pace (issue 30): from lam_growth facts in force on, λ grows in proportion
    # to them, λ_N = lam·max(1, N / lam_growth), so λΣ₀ keeps its weight against Σkkᵀ; each step re-forms
    # A exactly (A' = A + (λ_N − λ)Σ₀, LayerBank.set_lam), and the same schedule applied one-time gives
    # the same weights. 0: λ constant
    lam_growth: int = 0
    # how each step's residual R (target values minus the z-layer's hidden state) is split over the edited
    # layers: layer i of L (0-based, ascending) is asked for the share w_i / Σ_{j≥i} w_j of what is still
    # to place, w_i = residual_split^(−i). 1 is MEMIT's R/(L − i); > 1 asks the lower layers for more and
    # leaves less to the top (z-)layer (on the embedded model that triples the drift at g = 2:
    # docs/experiments/stability.md §9). Part of the stored targets, so sequential ≡ one-time holds for any value
    residual_split: float = 1.0
    # target-value optimisation (MEMIT compute_z)
    v_lr: float = 0.1
    v_steps: int = 25
    v_weight_decay: float = 0.5  # β of β·‖δ‖/‖h0‖²
    kl_factor: float = 0.0625  # κ
    # κ_c: weight of KL(p_δ ‖ p_0) of the token after the whole new target, on each format's template-free row: keeps
    # what the model says after the new object as it was (a guard against the object repeating)
    continuation_kl: float = 0.0
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ clamp·‖h0‖
    early_stop_loss: float = 5e-2
    # when a fact's value optimisation stops (checked before each Adam step): "nll" once its loss is
    # below early_stop_loss; "most_probable" once the new target is the argmax continuation at every
    # target token of every rewriting row, with a log-probability lead of at least stop_margin (nats)
    # over the runner-up: a fact stops spending its δ budget as soon as it wins
    stop_rule: str = "nll"
    stop_margin: float = 0.0
    # what the δ norm budget c·√F·‖h0‖ is measured on: "current" (h0 read on the edited model being
    # edited now) or "clean" (h0 of the same rows read with every edited layer at its base weight W₀):
    # an edited residual stream whose norm grew does not buy later facts a larger δ
    budget_anchor: str = "current"
    v_batch_facts: int = 50  # facts optimised together (memory bound, results do not depend on it)
    # matmul precision of the value optimisation's upper blocks: "float32", "bfloat16"/"float16" (their
    # linear layers compute from a weight copy in that dtype, everything else stays float32; δ, h0 and
    # every returned value stay float32/float64), or "auto" (bfloat16 where it is native, AMX/AVX512-BF16
    # or CUDA; see locate/values.py and locate/low_precision.py)
    v_compute_dtype: str = "float32"
    # how the value optimisation runs the blocks above the z-layer (issue 34, locate/fused_blocks.py):
    # "modules" (the model's own), "fused" (one fused function per block, Llama-family models),
    # "compiled" (the same under torch.compile), "auto" (fused where supported, else the modules); the same
    # values up to the order of floating-point operations
    v_upper_blocks: str = "auto"
    # context templates averaged into keys and values
    n_context_templates: int = 5
    context_template_len: int = 10  # total tokens per generated template, prompt word included
    template_seed: int = 0
    # with several prompt formats ("both"): one key column per format, each with its own target
    # (h0 of that format's row + the fact's δ), instead of one key averaged over the formats (False:
    # the behaviour before columns existed, measured in docs/chat.md). No effect with one format.
    format_columns: bool = True
    # Σ₀ statistics
    stats_tokens: int = 100_000
    stats_seq_len: int = 256
    # key forwards
    key_batch_rows: int = 256

    def __post_init__(self) -> None:
        layers = tuple(int(x) for x in self.layers)
        if not layers:
            raise ValueError("EditHParams.layers must name at least one layer")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"EditHParams.layers must be strictly ascending, got {layers}")
        object.__setattr__(self, "layers", layers)
        if not self.lam >= 0:  # also refuses NaN
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not self.continuation_kl >= 0:
            raise ValueError(f"continuation_kl must be >= 0, got {self.continuation_kl}")
        if self.v_compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"v_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.v_compute_dtype!r}")
        if self.v_upper_blocks not in UPPER_BLOCK_MODES:
            raise ValueError(f"v_upper_blocks must be one of {', '.join(UPPER_BLOCK_MODES)}, got {self.v_upper_blocks!r}")
        if not isinstance(self.format_columns, bool):
            raise ValueError(f"format_columns must be true or false, got {self.format_columns!r}")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {', '.join(STOP_RULES)}, got {self.stop_rule!r}")
        if not self.stop_margin >= 0:
            raise ValueError(f"stop_margin must be >= 0 (nats), got {self.stop_margin}")
        if self.budget_anchor not in BUDGET_ANCHORS:
            raise ValueError(f"budget_anchor must be one of {', '.join(BUDGET_ANCHORS)}, got {self.budget_anchor!r}")
        if isinstance(self.lam_growth, bool) or not isinstance(self.lam_growth, int) or self.lam_growth < 0:
            raise ValueError(f"lam_growth must be an int >= 0 (facts in force), got {self.lam_growth!r}")
        if not (isinstance(self.residual_split, (int, float)) and not isinstance(self.residual_split, bool)
                and 0 < self.residual_split < float("inf")):
            raise ValueError(f"residual_split must be a finite number > 0, got {self.residual_split!r}")
        if self.v_steps < 1 or self.v_lr <= 0:
            raise ValueError(f"v_steps must be >= 1 and v_lr > 0, got {self.v_steps}, {self.v_lr}")

    def lam_for(self, n_facts: int) -> float:
        """λ for ``n_facts`` facts in force (:attr:`lam_growth`'s schedule)."""
        return self.lam if not self.lam_growth else self.lam * max(1.0, n_facts / self.lam_growth)

    def residual_divisor(self, i: int) -> float:
        """The ``i``-th edited layer (0-based) is asked for the residual still to place divided by this:
        ``Σ_{j≥i} residual_split^(i−j)``, exactly ``L − i`` at :attr:`residual_split` 1 (MEMIT's split) and
        always 1 at the top layer."""
        n = len(self.layers)
        if not 0 <= i < n:
            raise IndexError(f"layer index {i} outside the {n} edited layers")
        g = float(self.residual_split)
        return sum(g ** (i - j) for j in range(i, n))

    @property
    def z_layer(self) -> int:
        return self.layers[-1]

    def for_formats(self, n_formats: int) -> "EditHParams":
        """These hyperparameters as an edit in ``n_formats`` prompt formats uses them: with one format
        ``format_columns`` has no effect and is settled to the value stored dicts imply when they lack it,
        so single-format ledgers, results folders and caches compare equal to those written before it."""
        if n_formats < 1:
            raise ValueError(f"an edit uses at least one prompt format, got {n_formats}")
        return self if n_formats > 1 else dataclasses.replace(self, format_columns=_ADDED_LATER["format_columns"])

    def override(self, **kw: Any) -> "EditHParams":
        """A copy with the given fields replaced; ``None`` values are ignored (handy for CLI flags)."""
        kw = {k: v for k, v in kw.items() if v is not None}
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **kw)

    @classmethod
    def parse_assignments(cls, items: Sequence[str]) -> dict[str, Any]:
        """``["lam=5000", "layers=4,5,6", "v_compute_dtype=bfloat16"]`` as typed overrides.

        Each value is converted to its field's type (``layers``: comma-separated integers); a
        ``ValueError`` names an unknown field or a value that does not convert.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for item in items:
            name, sep, raw = item.partition("=")
            name, raw = name.strip(), raw.strip()
            if not sep or not name or not raw:
                raise ValueError(f"hyperparameter assignment must be NAME=VALUE, got {item!r}")
            if name not in fields:
                raise ValueError(f"unknown hyperparameter {name!r}; known: {', '.join(sorted(fields))}")
            kind = type(getattr(_REFERENCE, name))
            try:
                if name == "layers":
                    out[name] = tuple(int(x) for x in raw.split(","))
                elif kind is bool:
                    out[name] = _as_bool(raw)
                elif kind is int:
                    out[name] = int(raw)
                elif kind is float:
                    out[name] = float(raw)
                else:
                    out[name] = raw
            except ValueError:
                raise ValueError(f"hyperparameter {name} takes a {kind.__name__}, got {raw!r}") from None
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values; a field added after others were stored is left out when it has the
        value that older dicts imply, so that results folders, ledgers and caches written before it still
        compare equal."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        for name, default in _ADDED_LATER.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditHParams":
        """Rebuild from ``to_dict`` output; a field added later takes the value older dicts imply (not
        its default) when absent. ``ValueError`` names unknown fields."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}")
        return cls(**{**_ADDED_LATER, **data})


_ADDED_LATER = {"format_columns": False, "continuation_kl": 0.0, "stop_rule": "nll", "stop_margin": 0.0,
                "budget_anchor": "current", "lam_growth": 0, "residual_split": 1.0}  # field -> the value that older stored dicts imply


def _as_bool(raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_REFERENCE = EditHParams(layers=(0,))  # field types for parse_assignments


# Keyed by a lower-case substring of the model name / path; first match wins. Each entry has named
# variants, the first being the default. For the paper's models: "paper" is "The Labyrinth and the
# Thread" Appendix B.4 (λ = 3,000 for all four) and "public-json" the AlphaEdit repository's JSONs
# (λ = 15,000 / 20,000; REFERENCE_NOTES §4, which leaves open which one reproduces Table 3).
_PRESETS: list[tuple[str, dict[str, dict[str, Any]]]] = [
    # Embedded default. "long-run": chosen on 1,000-edit sequential runs (docs/experiments/long-run-tuning.md,
    # CounterFact train split); two context templates instead of five halve the step at equal quality
    # there; continuation KL (stop 26) stops the new object repeating at equal quality over 1,000 edits
    # (results made before it name `continuation_kl=0`). "one-step": the first preset, chosen on 50
    # facts in one step (docs/experiments/layer-sweep.md), which drifts fast over many steps (kept for the results
    # made with it). v_compute_dtype="auto" (issue 34): the upper blocks in bfloat16 where it is native
    # (docs/performance.md: the same edits to δ cosine 0.995, 1.7x faster values on an AMX CPU).
    # stop_rule="most_probable" with a 1-nat lead (issue 30, stop 41; docs/experiments/stability.md §9): a fact
    # stops once its target leads every rival by a nat on every rewriting row, instead of spending its whole
    # budget (6 value steps a fact, not 11): at 2,000 edits the same efficacy as NLL stopping (92.5 / 92.7)
    # with less drift (+29.5 % / +33.0 % perplexity), and a step 22 % shorter; results made before name
    # `stop_rule=nll`.
    ("smollm2-135m", {"long-run": dict(layers=(4, 5, 6, 7, 8, 9, 10), lam=1500.0, v_lr=2.0, v_steps=12,
                                       clamp_norm_factor=0.4, n_context_templates=2, continuation_kl=1.0,
                                       v_compute_dtype="auto", v_batch_facts=100, stop_rule="most_probable",
                                       stop_margin=1.0),
                      "one-step": dict(layers=(6, 7, 8, 9, 10), lam=1500.0, v_lr=2.0, v_steps=12)}),
    ("gpt2-xl", {"paper": dict(layers=(13, 14, 15, 16, 17), lam=3000.0, v_lr=0.5, v_steps=20),
                 "public-json": dict(layers=(13, 14, 15, 16, 17), lam=20000.0, v_lr=0.5, v_steps=20)}),
    ("gpt-j", {"paper": dict(layers=(3, 4, 5, 6, 7, 8), lam=3000.0, v_lr=0.5, v_steps=25),
               "public-json": dict(layers=(3, 4, 5, 6, 7, 8), lam=15000.0, v_lr=0.5, v_steps=25)}),
    *[(key, {"paper": dict(layers=(4, 5, 6, 7, 8), lam=3000.0, v_lr=0.1, v_steps=25),
             "public-json": dict(layers=(4, 5, 6, 7, 8), lam=15000.0, v_lr=0.1, v_steps=25)})
      for key in ("llama-3", "llama3", "qwen2.5-7b")],  # Qwen2.5-7B: no public JSON; its λ is assumed
]


def preset_variants(name: str) -> tuple[str, ...]:
    """The named preset variants of model ``name`` (first = default); ``()`` for the generic default."""
    key = name.lower()
    return next((tuple(v) for pattern, v in _PRESETS if pattern in key), ())


def check_variant(name: str, variant: str | None) -> None:
    """``ValueError`` naming the variants model ``name`` has, unless ``variant`` is ``None`` or one of them."""
    if variant is None:
        return
    variants = preset_variants(name)
    if not variants:
        raise ValueError(f"{name} has no named presets (variant {variant!r}); its preset is the generic default")
    if variant not in variants:
        raise ValueError(f"{name} has no preset variant {variant!r}; it has {', '.join(variants)}")


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Five consecutive early-middle layers, the MEMIT heuristic scaled to depth (4–8 of 32)."""
    if n_layers <= 5:
        return tuple(range(max(0, n_layers - 2), n_layers)) if n_layers > 1 else (0,)
    start = max(1, round(n_layers * 4 / 32))
    return tuple(range(start, min(start + 5, n_layers)))


def preset_for(name: str, n_layers: int, variant: str | None = None) -> EditHParams:
    """The preset of model ``name`` (HF id, path or alias) with ``n_layers`` blocks.

    ``variant`` picks a named preset of that model (:func:`preset_variants`; default: its first, which
    for the paper's models is ``"paper"``); asking a variant the model does not have is a ``ValueError``.
    """
    check_variant(name, variant)
    key = name.lower()
    for pattern, variants in _PRESETS:
        if pattern in key:
            hp = EditHParams(**variants[variant or next(iter(variants))])
            if hp.layers[-1] < n_layers:
                return hp
            break
    if variant is not None:  # the named presets do not fit a model this shallow
        raise ValueError(f"{name} has no named presets (variant {variant!r}); its preset is the generic default")
    return EditHParams(layers=default_layers(n_layers))


__all__ = ["BUDGET_ANCHORS", "STOP_RULES", "UPPER_BLOCK_MODES", "EditHParams", "check_variant", "preset_for", "preset_variants", "default_layers"]
