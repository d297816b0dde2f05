"""Context templates: short texts sampled from the unedited model, prefixed to prompts.

MEMIT averages keys over the bare prompt and prompts prefixed with a few sampled sentences, and
optimises values on the same set (REFERENCE_NOTES §1.2). The reference samples without a seed; we
sample once per (model fingerprint, n, length, seed) with a fixed seed and cache the result, so
keys and values are reproducible and part of the recorded state. Special tokens are skipped when
decoding (avoids Llama-3's double BOS).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_write_json
from ..models.placement import input_device
from ..paths import build_once, cache_dir

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


def _sample(model, tokenizer, n: int, length: int, seed: int) -> list[str]:
    out: list[str] = []
    device = input_device(model)
    # manual_seed seeds every CUDA device too: fork them all, so the caller's CUDA streams are untouched
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())), torch.no_grad():
        torch.manual_seed(seed)
        for i in range(n):
            word = SEED_WORDS[i % len(SEED_WORDS)]
            enc = tokenizer(word, return_tensors="pt").to(device)
            new = max(1, length - enc["input_ids"].shape[1])
            gen = model.generate(
                **enc,
                do_sample=True,
                top_k=5,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=tokenizer.pad_token_id,
            )
            text = tokenizer.decode(gen[0], skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return out


def context_templates(loaded, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """``["{}", t_1..t_n]``: the bare template first, then ``n`` sampled prefixes ending in ". {}"."""
    if n <= 0:
        return ["{}"]
    path = cache_dir("templates") / f"{loaded.cache_key}-n{n}-len{length}-seed{seed}.json"

    def sample() -> list[str]:
        templates = ["{}", *_sample(loaded.model, loaded.tokenizer, n, length, seed)]
        atomic_write_json(path, templates)
        return templates

    return build_once(path, lambda: _read_templates(path, n), sample)


def _read_templates(path: Path, n: int) -> list[str] | None:
    """The cached templates at ``path`` if they are well-formed, else None (they are sampled again)."""
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list) and len(data) == n + 1 and all(t.count("{}") == 1 for t in data):
        return data
    return None
