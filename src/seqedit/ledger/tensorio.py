"""Tensors on disk for the ledger: safetensors bytes with a JSON tree of the non-tensor fields, sha256.

A nested state dict (``LayerMethodState.state_dict()``: dicts of tensors, numbers, strings, ``None``)
is flattened into ``{path: tensor}`` plus a JSON tree whose tensor leaves read ``{"__tensor__": path}``;
the tree travels in the safetensors header's ``__metadata__``. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

__all__ = ["decode", "encode", "flatten", "sha256", "unflatten"]

_TENSOR = "__tensor__"
_TREE = "tree"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flatten(obj: Any, prefix: str, out: dict[str, Tensor]) -> Any:
    """JSON tree of ``obj`` with every tensor moved into ``out`` under its ``/``-joined path."""
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        if any(t.data_ptr() == o.data_ptr() for o in out.values() if t.numel()):
            t = t.clone()  # safetensors refuses tensors that share memory
        out[prefix] = t
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        return {str(k): flatten(v, f"{prefix}/{k}", out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [flatten(v, f"{prefix}/{i}", out) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a ledger file")


def unflatten(tree: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree


def encode(tree_obj: Any) -> bytes:
    """safetensors bytes of a nested object (tensors + JSON-safe scalars)."""
    tensors: dict[str, Tensor] = {}
    tree = flatten(tree_obj, "", tensors)
    return st_save(tensors, metadata={_TREE: json.dumps(tree)})


def decode(data: bytes) -> Any:
    """Inverse of :func:`encode` (tensors on CPU, dtypes as stored)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    tree = json.loads(header.get("__metadata__", {}).get(_TREE, "null"))
    return unflatten(tree, st_load(data) if len(header) > 1 else {})


def as_dtype(name: str) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[name]
