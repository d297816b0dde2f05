"""Architecture adapters: where the edited FFN-output projection lives and how its weight is laid out.

seqedit edits the FFN output projection of a decoder block, ``y = W k`` with ``W: [d_out, d_in]`` in
*math layout* (``d_in`` = FFN intermediate size, ``d_out`` = hidden size). HF stores that matrix either
as ``nn.Linear`` (``weight: [d_out, d_in]``) or as GPT-2's ``Conv1D`` (``weight: [d_in, d_out]``). The
layout is declared per architecture, never guessed from shapes (square matrices would be ambiguous).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from .placement import compute_device, read_param, write_target


@dataclass(frozen=True)
class ArchSpec:
    """Static description of one decoder family.

    Attribute paths are dotted and relative to the ``*ForCausalLM`` model (``layers``, ``final_norm``)
    or to one block (``ffn_out``).
    """

    family: str
    model_types: tuple[str, ...]
    layers: str  # the ModuleList of decoder blocks
    ffn_out: str  # FFN output projection inside a block
    final_norm: str  # norm applied before the unembedding
    conv1d: bool = False  # True: weight stored [d_in, d_out] (GPT-2 Conv1D)
    parallel_block: bool = False  # attention and MLP read the same normed input (GPT-J, NeoX)


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("gpt2", ("gpt2",), "transformer.h", "mlp.c_proj", "transformer.ln_f", conv1d=True),
    ArchSpec("gptj", ("gptj",), "transformer.h", "mlp.fc_out", "transformer.ln_f", parallel_block=True),
    ArchSpec(
        "gpt_neox", ("gpt_neox",), "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm",
        parallel_block=True,
    ),
    ArchSpec("llama", ("llama",), "model.layers", "mlp.down_proj", "model.norm"),
    ArchSpec("mistral", ("mistral",), "model.layers", "mlp.down_proj", "model.norm"),
    ArchSpec("qwen2", ("qwen2",), "model.layers", "mlp.down_proj", "model.norm"),
    ArchSpec("qwen3", ("qwen3",), "model.layers", "mlp.down_proj", "model.norm"),
    ArchSpec("gemma", ("gemma", "gemma2"), "model.layers", "mlp.down_proj", "model.norm"),
    ArchSpec("phi3", ("phi3",), "model.layers", "mlp.down_proj", "model.norm"),
    ArchSpec("phi", ("phi",), "model.layers", "mlp.fc2", "model.final_layernorm", parallel_block=True),
)

_BY_TYPE: dict[str, ArchSpec] = {t: spec for spec in ARCHITECTURES for t in spec.model_types}


def register_architecture(spec: ArchSpec, *, replace: bool = False) -> ArchSpec:
    """Make the ``config.model_type`` values of ``spec`` editable (a decoder family seqedit does not
    ship). Raises ``ValueError`` if one is already registered, unless ``replace``."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"register_architecture needs an ArchSpec, got {type(spec).__name__}")
    if not spec.model_types:
        raise ValueError(f"{spec.family}: ArchSpec.model_types names no model_type")
    taken = sorted(t for t in spec.model_types if t in _BY_TYPE and _BY_TYPE[t] != spec)
    if taken and not replace:
        raise ValueError(f"model_type(s) {taken} are already registered (pass replace=True to redefine them)")
    for t in spec.model_types:
        _BY_TYPE[t] = spec
    return spec


def unregister_architecture(model_type: str) -> None:
    """Forget a registered ``model_type`` (for tests and plugins that register temporarily)."""
    _BY_TYPE.pop(model_type, None)


def supported_model_types() -> list[str]:
    """All ``config.model_type`` values seqedit can edit."""
    return sorted(_BY_TYPE)


def spec_for_model_type(model_type: str) -> ArchSpec:
    """The ``ArchSpec`` of ``model_type``; raises ``UnsupportedArchitectureError`` naming the supported ones."""
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}: seqedit supports "
            f"{', '.join(supported_model_types())}"
        ) from None


def _get(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class ModelAdapter:
    """Architecture-aware access to one causal LM's editable parts.

    Invariant: ``weight(i)`` and ``set_weight(i, W)`` speak math layout ``[d_out, d_in]`` whatever the
    storage layout, so that all linear algebra is layout-free.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.spec = spec or spec_for_model_type(model.config.model_type)
        self.blocks: nn.ModuleList = _get(model, self.spec.layers)
        if not isinstance(self.blocks, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"{self.spec.family}: {self.spec.layers!r} is not a ModuleList of decoder blocks"
            )

    @classmethod
    def for_model(cls, model: nn.Module) -> "ModelAdapter":
        return cls(model, spec_for_model_type(getattr(model.config, "model_type", "?")))

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def ffn_out(self, layer: int) -> nn.Module:
        """The edited module of ``layer``; its *input* is the key, its output the value."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        return _get(self.blocks[layer], self.spec.ffn_out)

    def ffn_out_name(self, layer: int) -> str:
        return f"{self.spec.layers}.{layer}.{self.spec.ffn_out}"

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    @property
    def unembed(self) -> nn.Module:
        """The output embedding (``lm_head``), bias included where the model has one (GPT-J)."""
        return self.model.get_output_embeddings()

    def dims(self, layer: int) -> tuple[int, int]:
        """``(d_out, d_in)`` of the edited matrix at ``layer``."""
        w = self.ffn_out(layer).weight
        return (w.shape[1], w.shape[0]) if self.spec.conv1d else (w.shape[0], w.shape[1])

    def weight(self, layer: int) -> torch.Tensor:
        """The edited matrix in math layout ``[d_out, d_in]`` (a detached view, model dtype; the offloaded
        copy when the module is offloaded)."""
        w = read_param(self.ffn_out(layer))
        return w.T if self.spec.conv1d else w

    def device(self, layer: int) -> torch.device:
        """Where the edited module of ``layer`` computes (its accelerate execution device, if dispatched)."""
        return compute_device(self.ffn_out(layer))

    @torch.no_grad()
    def set_weight(self, layer: int, w_math: torch.Tensor) -> None:
        """Write ``w_math: [d_out, d_in]`` into the module, cast to its dtype and layout. A CPU-offloaded
        module is written in its offloaded copy; quantized, disk-offloaded and meta weights are refused
        (:class:`~seqedit.errors.PlacementError`) before anything is written."""
        target = write_target(self.ffn_out(layer), "weight", f"the weight of {self.ffn_out_name(layer)}")
        stored = w_math.T if self.spec.conv1d else w_math
        if stored.shape != target.shape:
            raise ValueError(
                f"layer {layer}: weight of shape {tuple(w_math.shape)} does not fit "
                f"[d_out, d_in] = {self.dims(layer)}"
            )
        target.copy_(stored.to(device=target.device, dtype=target.dtype))
