"""Export an edited model: a plain HF directory, or only the edited matrices' deltas plus a loader.

The delta directory holds ``delta.safetensors`` (one tensor per edited parameter, named as in the
model's ``state_dict`` and in its storage layout, ``W − W₀``), ``seqedit_delta.json`` (base model name and
fingerprint, dtype) and ``apply_delta.py``, a standalone loader that needs only torch, safetensors and
transformers. Deltas are added in float64 and cast to the parameter's dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..bank import LayerBank
from ..models.load import LoadedModel, load_model
from ..models.placement import write_target
from .store import Ledger, LedgerError

__all__ = ["apply_delta", "export_delta", "export_model", "load_delta"]

DELTA_FILE = "delta.safetensors"
DELTA_META = "seqedit_delta.json"
PROVENANCE = "seqedit_ledger.json"

_LOADER = '''"""Apply seqedit weight deltas to a base model (standalone: torch, safetensors, transformers).

    python apply_delta.py [BASE_MODEL_DIR_OR_ID] OUT_DIR   # writes the edited model and its tokenizer
    from apply_delta import load; model = load()           # in Python (the recorded base, or load("BASE"))

BASE defaults to the base model recorded in seqedit_delta.json; seqedit's own names for it (such as
"smollm2-135m") are resolved when seqedit is installed.
"""
import json, pathlib, sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = pathlib.Path(__file__).resolve().parent
META = json.loads((HERE / "seqedit_delta.json").read_text())


def base_path(base=None):
    """Where the base model is: BASE, else the recorded name, through seqedit's aliases if it is installed."""
    base = base or META["base"]["name"]
    try:
        from seqedit.models.load import model_location
    except ImportError:
        return base
    return model_location(base)


def apply(model):
    deltas = load_file(str(HERE / "delta.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            p = params[name]
            p.copy_((p.double() + d.double().to(p.device)).to(p.dtype))
    return model


def load(base=None, **kwargs):
    kwargs.setdefault("dtype", getattr(torch, META["dtype"]))
    return apply(AutoModelForCausalLM.from_pretrained(base_path(base), **kwargs))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python apply_delta.py [BASE_MODEL_DIR_OR_ID] OUT_DIR")
    out, base = sys.argv[-1], base_path(sys.argv[1] if len(sys.argv) == 3 else None)
    load(base).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
'''


def _fresh_dir(path: Path) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LedgerError(f"export target {path} exists and is not an empty directory; choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def _publish(tmp: Path, path: Path) -> Path:
    """Move the finished temp dir into place (a crash leaves no half-written export under ``path``)."""
    for p in tmp.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700; an export is shared like any new folder
    if path.exists():
        path.rmdir()  # empty, checked by _fresh_dir
    os.rename(tmp, path)
    return path


def _umask() -> int:
    """The process umask, read without changing it where the OS reports it (Linux: ``/proc/self/status``),
    so that an export inside the threaded server never races another thread's file creation. Elsewhere
    the only way to read it is to set it and put it straight back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _provenance(L: Ledger) -> dict[str, Any]:
    man = L.manifest
    return {
        "base": {k: man["base"][k] for k in ("name", "fingerprint", "dtype")},
        "method": man["method_label"],
        "ledger": str(L.path.resolve()),
        "step": L.last_step,
        "facts_in_force": [r.fact.id for r in L.in_force()],
    }


def export_model(lm: LoadedModel, ledger: Ledger, path: str | os.PathLike) -> Path:
    """Save the live model (``save_pretrained``, safetensors) and tokenizer to ``path``, with the
    provenance of ``ledger``'s last step."""
    path = Path(path)
    tmp = _fresh_dir(path)
    try:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(json.dumps(_provenance(ledger), indent=2) + "\n")
        return _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_delta(lm: LoadedModel, bank: LayerBank, ledger: Ledger, path: str | os.PathLike,
                 dtype: str = "float32") -> Path:
    """Save ``W − W₀`` of every matrix in ``bank`` (``dtype`` float32 or float64), named as in ``lm``'s
    ``state_dict``, and the loader to ``path``."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"delta dtype must be float32 or float64, got {dtype!r}")
    path = Path(path)
    tmp = _fresh_dir(path)
    try:
        conv1d = lm.adapter.spec.conv1d
        tensors = {}
        for l in bank.layers:
            d = bank.delta(l).to(getattr(torch, dtype))
            tensors[f"{lm.adapter.ffn_out_name(l)}.weight"] = (d.T if conv1d else d).contiguous().cpu()
        save_file(tensors, str(tmp / DELTA_FILE))
        meta = {**_provenance(ledger), "dtype": str(lm.dtype).removeprefix("torch."), "delta_dtype": dtype}
        (tmp / DELTA_META).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "apply_delta.py").write_text(_LOADER)
        return _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def apply_delta(model: Any, delta_dir: str | os.PathLike, *, check_fingerprint: bool = True) -> Any:
    """Add the deltas in ``delta_dir`` to ``model`` (a :class:`~seqedit.LoadedModel` or an HF model) in
    place and return it. For a ``LoadedModel`` the base fingerprint must match unless told otherwise."""
    delta_dir = Path(delta_dir)
    meta = json.loads((delta_dir / DELTA_META).read_text())
    hf = getattr(model, "model", model)
    fp = getattr(model, "fingerprint", None)
    if check_fingerprint and fp is not None and fp != meta["base"]["fingerprint"]:
        raise LedgerError(
            f"the deltas in {delta_dir} were made for base {meta['base']['name']!r} "
            f"(fingerprint {meta['base']['fingerprint'][:16]}…), not {getattr(model, 'name', '?')!r} ({fp[:16]}…)"
        )
    # Every name, shape and place is checked from the file's header before a tensor is read or written:
    # an offloaded parameter (on meta) is written in its in-memory host copy, a disk-offloaded or
    # quantized one is refused (models.placement.write_target), and then nothing has changed.
    params = dict(hf.named_parameters())
    with safe_open(str(delta_dir / DELTA_FILE), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    missing = sorted(set(shapes) - set(params))
    if missing:
        raise LedgerError(f"the model has no parameters {missing} named in {delta_dir / DELTA_FILE}")
    targets = {}
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise LedgerError(f"{name}: delta shape {shape} does not fit the parameter {tuple(params[name].shape)}")
        owner, _, leaf = name.rpartition(".")
        targets[name] = write_target(hf.get_submodule(owner), leaf, name)
    deltas = load_file(str(delta_dir / DELTA_FILE))
    with torch.no_grad():
        for name, d in deltas.items():
            t = targets[name]
            t.copy_((t.double() + d.double().to(t.device)).to(t.dtype))
    return model


def load_delta(base: str, delta_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """``seqedit.load_model(base, **kwargs)`` with the deltas of ``delta_dir`` applied."""
    return apply_delta(load_model(base, **kwargs), delta_dir)
