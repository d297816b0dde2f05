"""Integration tests on the embedded SmolLM2-135M: exactness of SE ≡ OTE, and a real edit step."""

from __future__ import annotations

import pytest
import torch

import seqedit
from seqedit.evaluate.scoring import score_targets
from seqedit.shared_data import counterfact_path
from seqedit.locate.keys import ContextRows, read_keys
from seqedit.locate.values import compute_values

pytestmark = pytest.mark.integration

STATS_TOKENS = 20_000  # enough for a well-posed Σ₀; the preset's 100k is for real runs


@pytest.fixture(scope="module")
def smol():
    return seqedit.load_model("smollm2-135m")  # threads: tests/unit/conftest.py


def _restore(lm, w0: dict[int, torch.Tensor]) -> None:
    for layer, w in w0.items():
        lm.adapter.set_weight(layer, w)


def test_five_sequential_steps_equal_the_one_time_update(smol) -> None:
    """Keys and values frozen: 5 steps of 20 facts sum to the one-time update of 100 (rel. err < 1e-10)."""
    facts = seqedit.load_facts(counterfact_path(), split="train", limit=100)
    editor_se = seqedit.Editor(smol, stats_tokens=STATS_TOKENS)
    hp = editor_se.hparams
    w0 = {l: smol.adapter.weight(l).clone() for l in hp.layers}
    templates = editor_se.templates()
    # real keys at every edited layer and real (briefly optimised) values at the z-layer
    ctx = ContextRows.build(smol.tokenizer, facts, templates)
    bare = ContextRows.build(smol.tokenizer, facts, ["{}"])
    keys = read_keys(smol, ctx, hp.layers).keys
    h = read_keys(smol, bare, [], z_layer=hp.z_layer).z_hidden
    z = compute_values(smol, facts, templates, hp.override(v_steps=3)).z
    L = len(hp.layers)
    values = {l: w0[l].double() @ keys[l] + (z - h) / (L - i) for i, l in enumerate(hp.layers)}

    for lo in range(0, 100, 20):
        editor_se.apply_kv({l: k[:, lo : lo + 20] for l, k in keys.items()},
                           {l: v[:, lo : lo + 20] for l, v in values.items()})
    se = {l: editor_se.delta(l) for l in hp.layers}
    _restore(smol, w0)

    editor_ote = seqedit.Editor(smol, mode="one_time", stats_tokens=STATS_TOKENS)
    editor_ote.apply_kv(keys, values)
    _restore(smol, w0)
    rels = {}
    for l in hp.layers:
        ote = editor_ote.delta(l)
        assert ote.norm() > 0
        rels[l] = float((se[l] - ote).norm() / ote.norm())
    print("‖ΔSE − ΔOTE‖/‖ΔOTE‖ per layer:", {l: f"{r:.2e}" for l, r in rels.items()})
    assert max(rels.values()) < 1e-10, rels


def test_a_real_edit_step_flips_the_facts(smol) -> None:
    facts = seqedit.load_facts(counterfact_path(), split="train", limit=5)
    editor = seqedit.Editor(smol, stats_tokens=STATS_TOKENS)
    w0 = {l: smol.adapter.weight(l).clone() for l in editor.hparams.layers}
    try:
        pairs = [(f.text, f.target) for f in facts] + [(f.text, f.true_target) for f in facts]
        before = score_targets(smol, pairs)
        report = editor.apply(facts)
        after = score_targets(smol, pairs)
    finally:
        _restore(smol, w0)
    wins_before = sum(before[i].mean_nll < before[5 + i].mean_nll for i in range(5))
    wins_after = sum(after[i].mean_nll < after[5 + i].mean_nll for i in range(5))
    assert wins_after >= 4 and wins_after > wins_before, (wins_before, wins_after)
    assert report.final_residual < 0.5 * report.target_norm
    assert all(after[i].prob > before[i].prob for i in range(5))
