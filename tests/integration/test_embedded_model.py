"""The embedded SmolLM2-135M-Instruct: dequantised from the GGUF of the PyPI package once, then cached."""

from __future__ import annotations

import time

import torch

from seqedit.models.load import load_model
from test_models import _special_prefix


def test_embedded_smollm2_dequantise_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    first = load_model("smollm2-135m", device_map="cpu")
    t1 = time.perf_counter()
    second = load_model("embedded", device_map="cpu")
    t2 = time.perf_counter()
    print(f"\nsmollm2-135m: first load (dequantise + cache) {t1 - t0:.1f} s, cached load {t2 - t1:.1f} s")
    assert t2 - t1 < 15
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert first.fingerprint == second.fingerprint
    assert second.name == "smollm2-135m" and second.dtype == torch.float32
    a = second.adapter
    assert a.spec.family == "llama" and a.n_layers == 30 and a.dims(0) == (576, 1536)
    tok = second.tokenizer
    assert tok.padding_side == "right" and tok.pad_token is not None and _special_prefix(tok) == []
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = second.model(ids).logits[0, -1].argmax().item()
    assert tok.decode([top]).strip() == "Paris"  # the dequantised weights are a working model
