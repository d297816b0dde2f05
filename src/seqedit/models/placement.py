"""Where a model's tensors live: devices, accelerate offload, quantization.

One place answers "where is this parameter, and can it be read or written?" for models loaded with
a ``device_map`` (accelerate's hooks) as well as plain ones:

- an accelerate-dispatched module keeps an ``AlignDevicesHook`` in ``module._hf_hook``; an offloaded
  module's parameters sit on the ``meta`` device and its real values in the hook's ``weights_map``
  (a CPU ``state_dict`` for CPU offload, files for disk offload);
- a quantized parameter (bitsandbytes, GPTQ, …) is stored packed: its bytes are not the matrix.

Nothing here edits: :func:`read_param` returns a parameter's value, :func:`write_target` the tensor
a write must go into (or a clear :class:`~seqedit.errors.PlacementError`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import PlacementError

__all__ = ["HOST", "compute_device", "free_bytes", "input_device", "read_param", "write_target"]

HOST = torch.device("cpu")  # the one spelling of the host device; everything else follows tensors
_META = torch.device("meta")
_QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params", "QTensor", "AffineQuantizedTensor")


def _hooks(module: nn.Module) -> Iterator[Any]:
    """The accelerate hooks attached to ``module`` (a ``SequentialHook`` flattened)."""
    hook = getattr(module, "_hf_hook", None)
    stack = [hook] if hook is not None else []
    while stack:
        h = stack.pop()
        inner = getattr(h, "hooks", None)
        if inner is not None:
            stack.extend(inner)
        else:
            yield h


def _offload_map(module: nn.Module) -> Mapping | None:
    for h in _hooks(module):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h.weights_map
    return None


def _host_copy(weights_map: Mapping, key: str) -> torch.Tensor | None:
    """The in-memory tensor behind ``weights_map[key]`` that later forwards read (writes to it persist),
    or ``None`` when the map reads from files (each access is a fresh copy)."""
    prefix, store = "", weights_map
    while hasattr(store, "prefix") and hasattr(store, "dataset"):  # accelerate's PrefixedDataset
        prefix, store = prefix + store.prefix, store.dataset
    full = prefix + key
    if isinstance(store, dict):
        return store.get(full)
    in_memory = getattr(store, "state_dict", None)  # accelerate's OffloadedWeightsLoader
    if isinstance(in_memory, dict):
        return in_memory.get(full)
    return None


def is_quantized(param: torch.Tensor) -> bool:
    """A packed (quantized) parameter: not a plain floating-point matrix."""
    return type(param).__name__ in _QUANTIZED_PARAM_TYPES or not (param.dtype.is_floating_point or param.is_meta)


def read_param(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The value of ``module.<name>``: the parameter itself, or its offloaded copy when it sits on ``meta``."""
    param = getattr(module, name)
    if param.device != _META:
        return param.detach()
    weights_map = _offload_map(module)
    if weights_map is None:
        raise PlacementError(f"{type(module).__name__}.{name} is on the meta device and has no offloaded copy: "
                             "the model was not fully loaded")
    return weights_map[name].detach()


def write_target(module: nn.Module, name: str, what: str) -> torch.Tensor:
    """The tensor a write to ``module.<name>`` must go into: the parameter, or the in-memory host copy of a
    CPU-offloaded one. Refuses (``PlacementError`` naming ``what``) quantized parameters and parameters
    offloaded without writeback (disk offload, or meta without a copy)."""
    param = getattr(module, name)
    if is_quantized(param) or getattr(param, "quant_state", None) is not None:
        raise PlacementError(f"{what} is quantized ({type(param).__name__}, {param.dtype}): seqedit cannot write "
                             "an update into packed weights; load the model unquantized (e.g. --dtype bfloat16)")
    if param.device != _META:
        return param.data
    weights_map = _offload_map(module)
    target = None if weights_map is None else _host_copy(weights_map, name)
    if target is None:
        where = "offloaded to disk" if weights_map is not None else "on the meta device"
        raise PlacementError(f"{what} is {where}: an edit written there would be lost; keep the edited layers "
                             "on a device or offload them to CPU (device_map entries 'cpu', not 'disk')")
    return target


def compute_device(module: nn.Module, name: str = "weight") -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else its parameter's device."""
    for h in _hooks(module):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    return read_param(module, name).device


def free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes: the accelerator's, or the host's available RAM (``None`` when
    unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != HOST.type:
        return None
    try:  # MemAvailable counts reclaimable page cache, which free pages alone do not
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def input_device(model: nn.Module) -> torch.device:
    """The device the model's input ids belong on: where its input embedding computes."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is not None:
        return compute_device(emb, "weight")
    # a hand-built module without the HF accessor: where its first parameter is
    return next(model.parameters()).device
