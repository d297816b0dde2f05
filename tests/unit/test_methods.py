"""The method registry on random small layers: OTE equivalence of the aligned forms, the gap of the
naive ones, RLSEdit ≡ aligned MEMIT, Memorize-the-Latest ≡ direct OLS, persistence, parsing."""

from __future__ import annotations

import pytest
import torch

from seqedit.linalg import prune
from seqedit.methods import METHODS, LayerMethodState, MethodSpec, equivalence, parse_method

D_IN, D_OUT, N, STEPS = 12, 8, 3, 4


def _problem(seed: int, lam: float = 1.0):
    """Σ₀ with a near-null space (half the eigenvalues below AlphaEdit's 2e-2), W₀ and fixed batches."""
    g = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64, "generator": g}
    Q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, **f64))
    ev = torch.cat([torch.rand(D_IN // 2, **f64) * 1e-2, 0.5 + torch.rand(D_IN - D_IN // 2, **f64)])
    sigma0 = (Q * ev) @ Q.T
    W0 = torch.randn(D_OUT, D_IN, **f64) * 0.3
    batches = [(torch.randn(D_IN, N, **f64), torch.randn(D_OUT, N, **f64) * 3) for _ in range(STEPS)]
    return sigma0, lam, W0, batches


def _run_steps(spec: MethodSpec, sigma0, lam, W0, batches, state: LayerMethodState | None = None):
    state = state or spec.init_layer(sigma0, lam, W0)
    W, history = W0, []
    for K, V in batches:
        res = state.step(K, V - W @ K, W)
        W = W + res.applied
        history.append(W)
    return state, W, history


ALIGNED = [
    parse_method("memit", "aligned"),
    parse_method("memit", "aligned", ridge=0.5),
    parse_method("alphaedit", "aligned"),
    parse_method("alphaedit", "full"),
    parse_method("rlsedit"),
    parse_method("rlsedit", ridge=0.3, mu2=2.0),
]
NAIVE = [
    parse_method("memit", "naive"),
    parse_method("alphaedit", "naive"),
    parse_method("rect", "naive"),
    parse_method("prune", "naive"),
    parse_method("prune", "naive", reproduce_official_prune=True),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("spec", ALIGNED, ids=lambda s: s.label)
def test_aligned_forms_are_ote_equivalent(spec: MethodSpec, seed: int) -> None:
    out = equivalence(spec, *_problem(seed))
    assert out["gap_deployed"] < 1e-9, out
    assert out["gap_raw"] is None and out["steps"] == STEPS and out["n_facts"] == STEPS * N


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["prune", "rect"])
def test_post_processed_aligned_raw_weights_are_ote_equivalent(name: str, seed: int) -> None:
    sigma0, lam, W0, batches = _problem(seed)
    # A small W₀ makes PRUNE actually compress (σ_max(Δ) > σ_max(W)), so E is exercised for both.
    out = equivalence(parse_method(name, "aligned"), sigma0, lam, W0 * 0.05, batches)
    assert out["gap_raw"] < 1e-9, out
    uncorrected = equivalence(parse_method(name, "uncorrected"), sigma0, lam, W0 * 0.05, batches)
    assert uncorrected["gap_raw"] > 1e-3, uncorrected


def test_prune_aligned_compresses_on_this_data() -> None:
    sigma0, lam, W0, batches = _problem(0)
    spec = parse_method("prune", "aligned")
    state = spec.init_layer(sigma0, lam, W0 * 0.05)
    K, V = batches[0]
    res = state.step(K, V - W0 * 0.05 @ K, W0 * 0.05)
    assert not torch.allclose(res.applied, res.raw)


@pytest.mark.parametrize("spec", NAIVE, ids=lambda s: s.label + ("+official" if getattr(s, "reproduce_official_prune", False) else ""))
def test_naive_forms_show_a_gap(spec: MethodSpec) -> None:
    sigma0, lam, W0, batches = _problem(3)
    out = equivalence(spec, sigma0, lam, W0 * (0.05 if spec.name == "prune" else 1.0), batches)
    assert out["gap_deployed"] > 1e-3, out


def test_naive_prune_finalize_semantics() -> None:
    sigma0, lam, W0, batches = _problem(4)
    for official in (False, True):
        spec = parse_method("prune", "naive", reproduce_official_prune=official)
        memit = parse_method("memit", "naive")
        state, W, _ = _run_steps(spec, sigma0, lam, W0, batches)
        _, W_memit, _ = _run_steps(memit, sigma0, lam, W0, batches)
        assert torch.equal(W, W_memit)  # no per-step R_p
        pruned = prune(W - W0, W0)
        expect = (W if official else W0) + pruned
        assert torch.allclose(W + state.finalize(W), expect, atol=1e-12)
    assert parse_method("memit", "naive").init_layer(sigma0, lam, W0).finalize(W0) is None


@pytest.mark.parametrize("seed", [0, 5])
def test_rlsedit_without_ridge_equals_aligned_memit(seed: int) -> None:
    sigma0, lam, W0, batches = _problem(seed)
    _, W_rls, _ = _run_steps(parse_method("rlsedit", ridge=0.0), sigma0, lam, W0, batches)
    _, W_memit, _ = _run_steps(parse_method("memit", "aligned"), sigma0, lam, W0, batches)
    assert torch.linalg.matrix_norm(W_rls - W_memit) < 1e-10 * torch.linalg.matrix_norm(W_memit - W0)


def test_rlsedit_woodbury_state_survives_reanchoring() -> None:
    # 40 single-fact steps cross LayerSystem's Woodbury re-anchor (every 32 updates).
    sigma0, lam, W0, _ = _problem(2)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(D_IN, 1, dtype=torch.float64, generator=g), torch.randn(D_OUT, 1, dtype=torch.float64, generator=g)) for _ in range(40)]
    out = equivalence(parse_method("rlsedit", ridge=0.2), sigma0, lam, W0, batches)
    assert out["gap_deployed"] < 1e-9, out


@pytest.mark.parametrize("ridge", [0.0, 0.7])
def test_memorize_latest_exact_equals_direct_ols(ridge: float) -> None:
    sigma0, lam, W0, batches = _problem(6)
    spec = parse_method("memorize_latest", "exact", ridge=ridge)
    _, _, history = _run_steps(spec, sigma0, lam, W0, batches)
    eye = torch.eye(D_IN, dtype=torch.float64)
    for (K, V), W in zip(batches, history, strict=True):
        # Eq. (31)/(32): OLS on [K₀ | K_t] against [W₀K₀ | V_t], K₀K₀ᵀ = λΣ₀ (+ ρI).
        A = lam * sigma0 + ridge * eye + K @ K.T
        direct = W0 + torch.linalg.solve(A, K @ (V - W0 @ K).T).T
        assert torch.linalg.matrix_norm(W - direct) < 1e-10 * torch.linalg.matrix_norm(direct - W0)


def test_memorize_latest_nullspace_is_naive_alphaedit() -> None:
    sigma0, lam, W0, batches = _problem(7)
    _, W_ml, _ = _run_steps(parse_method("memorize_latest", "nullspace"), sigma0, lam, W0, batches)
    _, W_ae, _ = _run_steps(parse_method("alphaedit", "naive"), sigma0, lam, W0, batches)
    assert torch.allclose(W_ml, W_ae, rtol=0, atol=1e-12)


ALL_SPECS = [parse_method(n, a) for n, als in METHODS.items() for a in als]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.label)
def test_state_dict_round_trip_continues_identically(spec: MethodSpec) -> None:
    sigma0, lam, W0, batches = _problem(8)
    state, W, _ = _run_steps(spec, sigma0, lam, W0, batches[:2])
    restored = LayerMethodState.from_state_dict(state.state_dict())
    assert restored.spec == spec
    _, W_a, _ = _run_steps(spec, sigma0, lam, W, batches[2:], state=state)
    _, W_b, _ = _run_steps(spec, sigma0, lam, W, batches[2:], state=restored)
    assert torch.equal(W_a, W_b)
    fa, fb = state.finalize(W_a), restored.finalize(W_b)
    assert (fa is None and fb is None) or torch.equal(fa, fb)


def test_capabilities_name_the_forms_that_carry_the_whole_objective() -> None:
    # (StepResult.reference_target, which only restated W + raw for these forms, is gone; the registry
    # now says which forms know the objective's target: those matching OTE, and memorize_latest/exact.)
    for spec in ALL_SPECS:
        has = spec.alignment in ("aligned", "full", "exact")
        caps = spec.capabilities
        assert (caps.matches_one_time or caps.exact) == has, spec.label


def test_defaults() -> None:
    assert parse_method("prune").effective_ridge == 1.0
    assert parse_method("rect", "uncorrected").effective_ridge == 0.0
    assert parse_method("memit").effective_ridge == 0.0
    assert parse_method("memorize_latest").alignment == "exact"
    assert parse_method("Memorize-Latest").name == "memorize_latest"
    spec = parse_method("rect", "aligned", top_percent=40)
    assert MethodSpec(**spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("rome", None), {}, "unknown method 'rome'.*memit: aligned, naive"),
        (("memit", "full"), {}, "no alignment 'full'.*aligned, naive"),
        (("rlsedit", "naive"), {}, "no alignment 'naive'"),
        (("alphaedit", "aligned"), {"ridge": 1.0}, "no ridge"),
        (("memit", "aligned"), {"ridge": -1.0}, "ridge must be finite"),
        (("rect", "aligned"), {"top_percent": 150}, "top_percent must be ≤ 100"),
        (("prune", "aligned"), {"reproduce_official_prune": True}, "only to prune/naive"),
        (("memit", "aligned"), {"rho": 1.0}, "unknown option"),
        (("memit", "aligned"), {"mu2": 2.0}, "mu2 applies only to rlsedit"),
    ],
)
def test_parse_method_errors(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        parse_method(*args, **kwargs)


def test_init_layer_rejects_mismatched_shapes() -> None:
    sigma0, lam, W0, _ = _problem(0)
    with pytest.raises(ValueError, match="sigma0 must be a tensor"):
        parse_method("memit").init_layer(sigma0[:5, :5], lam, W0)


@pytest.mark.parametrize("alignment", ["aligned", "uncorrected"])
def test_prune_gets_the_low_rank_factors_of_each_update(alignment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PRUNE finds the singular values of Δ = R (A⁻¹K)ᵀ from its factors (no SVD of Δ); the result is the
    same as from the dense path. W₀ is scaled down so that σ_max(Δ) > σ_max(W) and PRUNE compresses."""
    import seqedit.methods.builtin as methods

    sigma0, lam, W0, batches = _problem(3)
    W0 = W0 * 0.05
    seen: list[bool] = []
    compressed: list[bool] = []

    def spy(delta, W, *, low_rank=None, sigma_max=None):
        seen.append(low_rank is not None)
        out = prune(delta, W, low_rank=low_rank)
        compressed.append(out is not delta)
        dense = prune(delta, W)
        assert torch.allclose(out, dense, rtol=0, atol=1e-10 * max(1.0, float(dense.abs().max())))
        return out

    monkeypatch.setattr(methods, "prune", spy)
    spec = parse_method("prune", alignment)
    state, W, _ = _run_steps(spec, sigma0, lam, W0, batches)
    assert len(seen) == STEPS and seen[0] and any(compressed)
    # uncorrected updates are always low-rank; aligned ones while E = 0 (after a compressing step,
    # E ≠ 0 makes Δ full-rank and the dense path is taken)
    if alignment == "uncorrected":
        assert all(seen)
    monkeypatch.undo()
    _, W_dense, _ = _run_steps(spec, sigma0, lam, W0, batches)
    assert torch.allclose(W, W_dense, rtol=0, atol=1e-9 * float(W_dense.abs().max()))
