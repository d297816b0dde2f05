"""λ that grows with the facts in force (issue 30, ``lam_growth``): re-forming ``A' = A + (λ' − λ)Σ₀`` moves
the weights exactly to the one-time solution under the new λ, so a schedule applied step by step gives
the weights of the same schedule applied one-time."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqedit import Editor, IllConditionedError
from seqedit.guards import InputError
from seqedit.linalg import LayerSystem
from seqedit.methods import parse_method
from seqedit.models.presets import EditHParams
from seqedit.testing import tiny_model

D_IN, D_OUT = 10, 6


def _problem(seed: int, steps: int, n: int):
    g = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64, "generator": g}
    X = torch.randn(D_IN, 3 * D_IN, **f64)
    sigma0 = X @ X.T / X.shape[1]
    W0 = torch.randn(D_OUT, D_IN, **f64)
    batches = [(torch.randn(D_IN, n, **f64), torch.randn(D_OUT, n, **f64) * 2) for _ in range(steps)]
    return sigma0, W0, batches


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), lams=st.lists(st.floats(0.05, 50.0), min_size=2, max_size=5),
       n=st.integers(1, 4), form=st.sampled_from([("memit", "aligned", {}), ("memit", "aligned", {"ridge": 0.3}),
                                                  ("rlsedit", None, {}), ("rlsedit", None, {"mu2": 2.0})]))
def test_relam_between_steps_equals_one_time_with_the_last_lam(seed, lams, n, form):
    name, alignment, options = form
    spec = parse_method(name, alignment, **options)
    sigma0, W0, batches = _problem(seed, len(lams), n)
    state, W = spec.init_layer(sigma0, lams[0], W0), W0
    for lam, (K, V) in zip(lams, batches):  # each step first re-forms for its own λ, then adds its batch
        W = W + state.relam(lam, sigma0, W, W0)
        W = W + state.step(K, V - W @ K, W).applied
    K_all = torch.cat([K for K, _ in batches], dim=1)
    V_all = torch.cat([V for _, V in batches], dim=1)
    one = spec.init_layer(sigma0, lams[-1], W0)
    W_ote = W0 + one.step(K_all, V_all - W0 @ K_all, W0).applied
    assert float((W - W_ote).norm() / (W_ote - W0).norm()) < 1e-8


def test_with_lam_is_the_closed_form_and_leaves_the_system_unchanged():
    sigma0, W0, batches = _problem(0, 1, 3)
    K, V = batches[0]
    sys = LayerSystem(sigma0, 2.0)
    W = W0 + sys.update(K, V - W0 @ K)
    A_before = sys.A
    new, delta = sys.with_lam(7.0, sigma0, W - W0)
    assert sys.A is A_before and sys.lam == 2.0 and new.lam == 7.0
    assert torch.allclose(new.A, 7.0 * sigma0 + K @ K.T, atol=1e-12)
    expect = W0 + (V - W0 @ K) @ K.T @ torch.linalg.inv(7.0 * sigma0 + K @ K.T)  # B A'⁻¹ (test only)
    assert torch.allclose(W + delta, expect, atol=1e-10)
    same, zero = sys.with_lam(2.0, sigma0, W - W0)
    assert float(zero.abs().max()) == 0.0 and same.lam == 2.0


def test_a_lam_that_leaves_A_singular_is_refused_and_nothing_changes():
    sigma0, W0, batches = _problem(1, 1, 2)
    K, V = batches[0]
    sys = LayerSystem(sigma0, 1.0)  # no ridge: at λ = 0, A = KKᵀ has rank 2 of 10
    W = W0 + sys.update(K, V - W0 @ K)
    A = sys.A
    with pytest.raises(IllConditionedError):
        sys.with_lam(0.0, sigma0, W - W0)
    assert sys.lam == 1.0 and sys.A is A


@pytest.mark.parametrize("method,alignment,options", [("memit", "naive", {}), ("prune", "uncorrected", {}),
                                                      ("alphaedit", "aligned", {"threshold": 10.0})])
def test_forms_without_an_exact_reformation_refuse(method, alignment, options):
    spec = parse_method(method, alignment, **options)
    sigma0, W0, _ = _problem(2, 1, 2)
    state = spec.init_layer(sigma0, 1.0, W0)
    with pytest.raises(ValueError, match="cannot change λ exactly"):
        state.relam(2.0, sigma0, W0, W0)


def test_the_schedule():
    hp = EditHParams(layers=(1, 2), lam=10.0, lam_growth=100)
    assert [hp.lam_for(n) for n in (0, 50, 100, 250)] == [10.0, 10.0, 10.0, 25.0]
    assert EditHParams(layers=(1,), lam=10.0).lam_for(10**6) == 10.0
    with pytest.raises(ValueError, match="lam_growth"):
        EditHParams(layers=(1,), lam_growth=-1)
    assert "lam_growth" not in EditHParams(layers=(1,)).to_dict()  # older stored dicts still compare equal


def _kv(lm, n: int, layers=(1, 2)):
    g = torch.Generator().manual_seed(3)
    K = {l: torch.randn(lm.adapter.weight(l).shape[1], n, generator=g, dtype=torch.float64) for l in layers}
    V = {l: lm.adapter.weight(l).double() @ K[l] + torch.randn(lm.adapter.weight(l).shape[0], n, generator=g,
                                                                dtype=torch.float64) for l in layers}
    return K, V


def test_the_editor_grows_lam_and_sequential_equals_one_time_with_the_same_schedule():
    lm_se, lm_ote = tiny_model("llama"), tiny_model("llama")
    kw = dict(layers=(1, 2), stats_tokens=2000, lam=10.0, lam_growth=8)
    se, ote = Editor(lm_se, **kw), Editor(lm_ote, **kw)
    K, V = _kv(lm_se, 24)
    for lo in range(0, 24, 6):  # 6, 12, 18, 24 facts in force: λ = 10, 15, 22.5, 30
        se.apply_kv({l: K[l][:, lo:lo + 6] for l in K}, {l: V[l][:, lo:lo + 6] for l in V})
    ote.apply_kv(K, V)
    assert se.bank.lam == ote.bank.lam == 30.0
    for l in (1, 2):
        gap = float((se.delta(l) - ote.delta(l)).norm() / ote.delta(l).norm())
        assert gap < 1e-9, gap
        assert se.systems[l].lam == 30.0
    constant = Editor(tiny_model("llama"), **{**kw, "lam_growth": 0})
    constant.apply_kv(K, V)
    changed = float((constant.delta(1) - ote.delta(1)).norm() / ote.delta(1).norm())
    assert changed > 1e-6  # the schedule did change the weights, by far more than the exactness gap


def test_a_schedule_is_refused_for_an_inexact_form():
    lm = tiny_model("llama")
    with pytest.raises(InputError, match="memit/aligned, rlsedit"):
        Editor(lm, method="memit", alignment="naive", layers=(1, 2), stats_tokens=2000, lam=10.0, lam_growth=8)


def test_a_failed_step_takes_the_reformation_back(monkeypatch):
    import seqedit.editor

    lm = tiny_model("llama")
    ed = Editor(lm, layers=(1, 2), stats_tokens=2000, lam=10.0, lam_growth=4)
    K, V = _kv(lm, 12)
    ed.apply_kv({l: K[l][:, :6] for l in K}, {l: V[l][:, :6] for l in V})
    lam, masters = ed.bank.lam, {l: ed.master[l].clone() for l in (1, 2)}
    assert lam == 15.0

    def boom(*a, **k):
        raise RuntimeError("solve failed")

    monkeypatch.setattr(seqedit.editor, "solve_layers", boom)
    with pytest.raises(RuntimeError, match="solve failed"):  # λ would have become 30 for 12 facts
        ed.apply_kv({l: K[l][:, 6:] for l in K}, {l: V[l][:, 6:] for l in V})
    assert ed.systems[1].lam == ed.systems[2].lam == ed.bank.lam == 15.0
    assert all(torch.equal(ed.master[l], masters[l]) for l in (1, 2))
    monkeypatch.undo()  # the retry re-forms from 15 to 30 and equals the one-time solve of all 12 with λ = 30
    ed.apply_kv({l: K[l][:, 6:] for l in K}, {l: V[l][:, 6:] for l in V})
    ote = Editor(tiny_model("llama"), layers=(1, 2), stats_tokens=2000, lam=10.0, lam_growth=4)
    ote.apply_kv(K, V)
    assert ed.bank.lam == ote.bank.lam == 30.0
    assert float((ed.delta(1) - ote.delta(1)).norm() / ote.delta(1).norm()) < 1e-9
