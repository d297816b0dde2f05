"""The fused forward of the blocks above the z-layer (``locate/fused_blocks.py``) computes what the
model's own modules compute: per row group (left-padded prefixes of several lengths in the cache,
right-padded suffixes, grouped-query attention, Qwen2's q/k/v biases), through the whole value
optimisation, compiled or not; it is refused or skipped where it does not apply."""

from __future__ import annotations

import logging

import pytest
import torch

from seqedit.facts import Fact
from seqedit.locate import fused_blocks
from seqedit.locate.fused_blocks import FusedUpper, attention_mask, unsupported
from seqedit.locate.value_rows import RowGroup, build_rows, length_groups
from seqedit.locate.values import compute_values
from seqedit.locate.trace import block_hidden, frozen_parameters, replace_block_hidden
from seqedit.models.presets import EditHParams
from seqedit.testing import tiny_model

FACTS = [
    Fact("{} plays the", "Miles Davis", "piano", true_target="trumpet"),
    Fact("The capital city of {} is", "the Republic of France", "Rome", true_target="Paris"),
    Fact("{} speaks", "Danielle Darrieux", "English", true_target="French"),
]
TEMPLATES = ["{}", "Tomorrow at noon we will say that. {}", "Well. {}"]
Z = 1


def _pair(lm, group: RowGroup, upper: FusedUpper, delta: torch.Tensor):
    """Final hidden states of ``group`` with ``delta`` at each row's subject-last token: modules, fused."""

    def shift(h, g):
        add = torch.zeros_like(h)
        add[:, 0] = delta[: h.shape[0]]
        return h + add

    def inject(out, g):
        if g.replay.hidden is None:
            g.replay.record(out)
        return replace_block_hidden(out, shift(block_hidden(out), g))

    with torch.no_grad():
        ref = group.forward(lm, Z, inject)
        group.replay.hidden = None  # the fused pass records block Z's output itself
        got = group.forward_fused(lm, Z, upper, shift)
    return ref, got


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fused_blocks_equal_the_models_modules_on_every_row_group(family: str) -> None:
    lm = tiny_model(family, n_layers=4, hidden=64, intermediate=128)
    if family == "qwen2":  # random q/k/v biases, so that a dropped one shows
        with torch.no_grad():
            for block in lm.adapter.blocks:
                for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    rows = build_rows(lm.tokenizer, FACTS, TEMPLATES, "bare", continuation=True)
    upper = FusedUpper.for_model(lm, Z, "fused", None)
    assert upper is not None and not upper.compiled
    torch.manual_seed(0)
    with frozen_parameters(lm.model):
        groups = [RowGroup(lm, [rows[i] for i in g], Z) for g in length_groups([len(r.suffix) for r in rows])]
        assert any(g.prefix is not None and g.full_mask[:, 0].eq(0).any() for g in groups), "no left padding tested"
        for group in groups:
            delta = torch.randn(len(group.rows), lm.adapter.dims(Z)[0])
            ref, got = _pair(lm, group, upper, delta)
            real = group.full_mask[:, -group.suf_ids.shape[1]:].bool()
            torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_groups_packed_into_one_pass_equal_each_group_alone_forward_and_backward(family: str) -> None:
    lm = tiny_model(family, n_layers=4, hidden=64, intermediate=128)
    rows = build_rows(lm.tokenizer, FACTS, TEMPLATES, "bare", continuation=True)
    upper = FusedUpper.for_model(lm, Z, "fused", None)
    torch.manual_seed(1)
    with frozen_parameters(lm.model):
        groups = [RowGroup(lm, [rows[i] for i in g], Z) for g in length_groups([len(r.suffix) for r in rows])]
        assert len(groups) >= 3 and len({g.suf_ids.shape[1] for g in groups}) >= 3, "too few lengths to pack"
        d = lm.adapter.dims(Z)[0]
        deltas = [torch.randn(len(g.rows), d, requires_grad=True) for g in groups]
        shifts = []
        for delta in deltas:
            def shift(h, g, delta=delta):
                add = torch.zeros(h.shape[0], h.shape[1], h.shape[2])
                add = add.index_put((torch.arange(h.shape[0]), torch.zeros(h.shape[0], dtype=torch.long)), delta)
                return h + add
            shifts.append(shift)
        def inputs():
            return [g.fused_input(lm, Z, upper, s) for g, s in zip(groups, shifts)]

        weights = [torch.randn_like(x.h) for x in inputs()]  # a loss that reaches every position

        def grads(outs):
            loss = sum((o * w).sum() for o, w in zip(outs, weights))
            return outs, torch.autograd.grad(loss, deltas)

        alone, g_alone = grads([upper.forward_groups([x])[0] for x in inputs()])
        packed, g_packed = grads(upper.forward_groups(inputs()))
    for a, p in zip(alone, packed):
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-5)
    for a, p in zip(g_alone, g_packed):
        assert a.abs().max() > 0
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-5)


def test_the_mask_lets_a_suffix_query_see_real_prefix_tokens_and_earlier_suffix_tokens() -> None:
    full = torch.tensor([[0, 1, 1, 1, 1, 0]])  # one padded prefix slot, suffix of 2 real tokens and a pad
    m = attention_mask(full, 3)[0, 0]
    assert m.tolist() == [[False, True, True, True, False, False],
                          [False, True, True, True, True, False],
                          [False, True, True, True, True, False]]


def test_values_through_fused_blocks_track_the_modules() -> None:
    lm = tiny_model("llama", n_layers=4, hidden=64, intermediate=128)
    hp = EditHParams(layers=(0, 1), v_lr=0.5, v_steps=8, early_stop_loss=-1.0, v_batch_facts=2, continuation_kl=1.0)
    modules = compute_values(lm, FACTS, TEMPLATES, hp.override(v_upper_blocks="modules"))
    fused = compute_values(lm, FACTS, TEMPLATES, hp.override(v_upper_blocks="fused"))
    torch.testing.assert_close(fused.h0, modules.h0, rtol=0, atol=0)  # the blocks up to z are the model's
    torch.testing.assert_close(fused.z, modules.z, rtol=1e-4, atol=1e-4)
    assert fused.steps == modules.steps


def test_compiled_blocks_track_the_eager_ones() -> None:
    lm = tiny_model("llama", n_layers=4, hidden=64, intermediate=128)
    hp = EditHParams(layers=(0, 1), v_lr=0.5, v_steps=4, early_stop_loss=-1.0)
    upper = FusedUpper.for_model(lm, hp.z_layer, "compiled", None)
    if not upper.compiled:
        pytest.skip("inductor cannot compile here (no C++ compiler)")
    fused = compute_values(lm, FACTS, TEMPLATES, hp.override(v_upper_blocks="fused"))
    compiled = compute_values(lm, FACTS, TEMPLATES, hp.override(v_upper_blocks="compiled"))
    torch.testing.assert_close(compiled.z, fused.z, rtol=1e-4, atol=1e-4)


def test_a_failed_compile_falls_back_to_the_eager_fused_block(monkeypatch, caplog) -> None:
    def broken(fn, **_kw):
        def run(*_a, **_k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fused_blocks, "_compiled", {})
    lm = tiny_model("llama", n_layers=4, hidden=32, intermediate=64)
    with caplog.at_level(logging.WARNING, logger="seqedit.locate.fused_blocks"):
        upper = FusedUpper.for_model(lm, 1, "compiled", None)
    assert upper.block_fn is fused_blocks.fused_block and not upper.compiled
    assert "no compiler here" in caplog.text


def test_unsupported_models_use_their_modules_or_are_refused_by_name() -> None:
    gpt2 = tiny_model("gpt2")
    assert "gpt2" in unsupported(gpt2, 1)
    assert FusedUpper.for_model(gpt2, 1, "auto", None) is None
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        FusedUpper.for_model(gpt2, 1, "fused", None)
    qwen3 = tiny_model("qwen3")
    assert "qwen3" in unsupported(qwen3, 1)
    llama = tiny_model("llama")
    assert FusedUpper.for_model(llama, 1, "modules", None) is None
    assert "no block above" in unsupported(llama, llama.adapter.n_layers - 1)
    auto = FusedUpper.for_model(llama, 1, "auto", None)  # the eager fused block, never a compile
    assert auto is not None and not auto.compiled
    with pytest.raises(ValueError, match="v_upper_blocks must be one of"):
        EditHParams(layers=(1,), v_upper_blocks="triton")

