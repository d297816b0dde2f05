"""Properties of seqedit.linalg's nullspace, postprocess and compensation (REFERENCE_NOTES §2.4–2.6,
§2.10): AlphaEdit's reduced r×r form equals the full-size solve, PRUNE / RECT follow their formulas,
and Algorithm 1's error compensation keeps ``W_{t−1} + Δ_t`` equal to the one-time solution."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqedit.errors import IllConditionedError
from seqedit.linalg import AlphaEditSystem, ErrorCompensation, LayerSystem, NullSpace, prune, rect

F64 = torch.float64
PROPERTY = settings(max_examples=25, deadline=None)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def rel(X: torch.Tensor, Y: torch.Tensor) -> float:
    scale = max(X.norm().item(), Y.norm().item())
    return (X - Y).norm().item() / scale if scale > 0 else 0.0


# ---------------------------------------------------------------------------------------- AlphaEdit


@dataclass
class NullProblem:
    sigma0: torch.Tensor
    threshold: float
    r: int
    d_out: int
    Ks: list[torch.Tensor]
    Vs: list[torch.Tensor]
    W0: torch.Tensor


@st.composite
def null_problems(draw, n_batches: int = 3) -> NullProblem:
    """Σ₀ = Q diag(e) Qᵀ with r eigenvalues in [0, thr/2) and the rest in [2·thr, 10]: the null space
    has exactly r dimensions, with a clear margin on both sides of the threshold."""
    d = draw(st.integers(2, 20))
    r = draw(st.integers(1, d))
    thr = draw(st.sampled_from([2e-2, 1e-1]))
    d_out = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(0, 5), min_size=n_batches, max_size=n_batches))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    small = torch.rand(r, generator=gen, dtype=F64) * thr / 2
    small[0] = 0.0  # an exact zero: Σ₀ is usually rank-deficient
    large = 2 * thr + torch.rand(d - r, generator=gen, dtype=F64) * (10 - 2 * thr)
    Q, _ = torch.linalg.qr(randn(gen, d, d))
    e = torch.cat([small, large])
    return NullProblem(
        sigma0=(Q * e) @ Q.T,
        threshold=thr,
        r=r,
        d_out=d_out,
        Ks=[randn(gen, d, n) for n in sizes],
        Vs=[randn(gen, d_out, n) for n in sizes],
        W0=randn(gen, d_out, d),
    )


def dense_projector(null: NullSpace) -> torch.Tensor:
    return null.U0 @ null.U0.T


def full_size_delta(P: torch.Tensor, C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, alpha: float) -> torch.Tensor:
    """REFERENCE_NOTES §2.4 as the reference solves it: ``(P (K Kᵀ + C) + αI) X = P K Rᵀ``, ``Δ = Xᵀ``
    (``C`` includes λΣ₀ for the full objective), by a general dense LU."""
    d = P.shape[0]
    X = torch.linalg.solve(P @ (K @ K.T + C) + alpha * torch.eye(d, dtype=F64), P @ K @ R.T)
    return X.T


@PROPERTY
@given(p=null_problems(n_batches=0))
def test_null_space_is_the_small_eigenspace(p: NullProblem) -> None:
    null = NullSpace.from_sigma0(p.sigma0, p.threshold)
    assert null.r == p.r and null.d == p.sigma0.shape[0]
    assert tuple(null.U0.shape) == (null.d, null.r) and null.U0.is_contiguous()
    torch.testing.assert_close(null.U0.T @ null.U0, torch.eye(null.r, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(p.sigma0 @ null.U0, null.U0 * null.eigenvalues, rtol=0, atol=1e-12)
    assert (null.eigenvalues < p.threshold).all() and (null.eigenvalues.diff() >= 0).all()
    X = torch.randn(null.d, 3, dtype=F64)
    U0 = null.U0
    torch.testing.assert_close(U0 @ (U0.mT @ X), dense_projector(null) @ X, rtol=0, atol=1e-12)
    torch.testing.assert_close(U0 @ (U0.mT @ X[:, 0]), dense_projector(null) @ X[:, 0], rtol=0, atol=1e-12)


@PROPERTY
@given(
    p=null_problems(n_batches=3),
    alpha=st.sampled_from([0.1, 1.0, 10.0]),
    variant=st.sampled_from(["aligned", "naive", "full"]),
)
def test_reduced_form_equals_full_size_solve(p: NullProblem, alpha: float, variant: str) -> None:
    lam = 50.0 if variant == "full" else 0.0
    null = NullSpace.from_sigma0(p.sigma0, p.threshold)
    system = AlphaEditSystem(null, alpha=alpha, lam=lam, full=variant == "full")
    P = dense_projector(null)
    C = lam * p.sigma0
    U1 = torch.linalg.eigh(p.sigma0).eigenvectors[:, null.r :]  # the preserved directions
    for K, V in zip(p.Ks, p.Vs):
        R = V  # the identity holds for any residuals
        delta = system.update(K, R, accumulate=variant != "naive")
        assert rel(delta, full_size_delta(P, C, K, R, alpha)) < 1e-10
        assert delta.norm() <= 1e-10 * max(1.0, R.norm().item()) or (delta @ U1).norm() <= 1e-10 * delta.norm()
        if variant != "naive":
            C = C + K @ K.T
    n_keys = sum(K.shape[1] for K in p.Ks)
    assert system.n_constraints == (0 if variant == "naive" else n_keys)


def one_time_alpha(p: NullProblem, null: NullSpace, alpha: float, batches: list[int]) -> torch.Tensor:
    """All batches in one full-size solve from W₀."""
    d = p.sigma0.shape[0]
    K = torch.cat([p.Ks[i] for i in batches] + [torch.empty(d, 0, dtype=F64)], 1)
    V = torch.cat([p.Vs[i] for i in batches] + [torch.empty(p.d_out, 0, dtype=F64)], 1)
    P = dense_projector(null)
    return p.W0 + full_size_delta(P, torch.zeros(d, d, dtype=F64), K, V - p.W0 @ K, alpha)


@PROPERTY
@given(p=null_problems(n_batches=3), alpha=st.sampled_from([0.1, 10.0]))
def test_aligned_alpha_edit_equals_one_time_and_removal_is_exact(p: NullProblem, alpha: float) -> None:
    """α is a ridge on the total update in the null space, so aligned steps telescope (DESIGN §2)."""
    null = NullSpace.from_sigma0(p.sigma0, p.threshold)
    system = AlphaEditSystem(null, alpha=alpha)
    W = p.W0
    for K, V in zip(p.Ks, p.Vs):
        W = W + system.update(K, V - W @ K)
    W_all = one_time_alpha(p, null, alpha, [0, 1, 2])
    assert rel(W - p.W0, W_all - p.W0) < 1e-10
    K, V = p.Ks[1], p.Vs[1]
    W = W + system.update(None, None, K, V - W @ K)
    scale = max((W_all - p.W0).norm().item(), 1.0)
    assert (W - one_time_alpha(p, null, alpha, [0, 2])).norm().item() / scale < 1e-10
    assert system.n_constraints == p.Ks[0].shape[1] + p.Ks[2].shape[1]


@PROPERTY
@given(p=null_problems(n_batches=2))
def test_naive_step_neither_uses_nor_changes_the_state(p: NullProblem) -> None:
    null = NullSpace.from_sigma0(p.sigma0, p.threshold)
    aligned = AlphaEditSystem(null)
    aligned.update(p.Ks[0], p.Vs[0])
    M, n = aligned.M, aligned.n_constraints
    naive = aligned.update(p.Ks[1], p.Vs[1], accumulate=False)
    assert aligned.M is M and aligned.n_constraints == n
    fresh = AlphaEditSystem(null).update(p.Ks[1], p.Vs[1])
    torch.testing.assert_close(naive, fresh, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="accumulate=True"):
        aligned.update(None, None, p.Ks[0], p.Vs[0], accumulate=False)


@PROPERTY
@given(p=null_problems(n_batches=3), full=st.booleans())
def test_alpha_edit_state_dict_round_trip_is_bitwise(p: NullProblem, full: bool) -> None:
    null = NullSpace.from_sigma0(p.sigma0, p.threshold)
    live = AlphaEditSystem(null, alpha=2.0, lam=7.0 if full else 0.0, full=full)
    live.update(p.Ks[0], p.Vs[0])
    restored = AlphaEditSystem.from_state_dict(live.state_dict())
    assert repr(restored) == repr(live)
    for K, V in zip(p.Ks[1:], p.Vs[1:]):
        assert torch.equal(restored.update(K, V), live.update(K, V))
    assert torch.equal(restored.M, live.M)


def test_alpha_edit_failures_leave_the_state_unchanged() -> None:
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(randn(gen, 6, 6))
    sigma0 = (Q * torch.tensor([0.0, 1e-3, 1.0, 2.0, 3.0, 4.0], dtype=F64)) @ Q.T
    system = AlphaEditSystem(NullSpace.from_sigma0(sigma0), alpha=1.0)
    K, R = randn(gen, 6, 2), randn(gen, 3, 2)
    system.update(K, R)
    M, n, twin = system.M, system.n_constraints, system.copy()
    bad = [
        ((randn(gen, 5, 2), R), ValueError, r"K_add must have shape \[6, \?\]"),
        ((K, randn(gen, 3, 3)), ValueError, r"R_add must have shape \[\?, 2\]"),
        ((K, None), ValueError, "both be given"),
        ((None, None), ValueError, "update needs"),
        ((K, R, K[:, :1], randn(gen, 4, 1)), ValueError, "disagree on d_out"),
        ((None, None, torch.cat([K, K], 1), torch.cat([R, R], 1)), ValueError, "only 2 would be in force"),
        # A key never added, far larger than α: M − k kᵀ is indefinite.
        ((None, None, 100 * Q[:, :1], R[:, :1]), IllConditionedError, "positive definite.*state unchanged"),
    ]
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            system.update(*args)
        assert system.M is M and system.n_constraints == n
    K2, R2 = randn(gen, 6, 1), randn(gen, 3, 1)
    assert torch.equal(system.update(K2, R2), twin.update(K2, R2))


def test_alpha_edit_argument_errors() -> None:
    sigma0 = torch.diag(torch.tensor([0.0, 1e-3, 1.0, 2.0], dtype=F64))
    for thr in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="threshold"):
            NullSpace.from_sigma0(sigma0, thr)
    with pytest.raises(ValueError, match="not symmetric"):
        NullSpace.from_sigma0(sigma0 + torch.triu(torch.ones(4, 4, dtype=F64), 1))
    with pytest.raises(ValueError, match="square"):
        NullSpace.from_sigma0(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="NaN"):
        NullSpace.from_sigma0(torch.full((3, 3), float("nan"), dtype=F64))
    null = NullSpace.from_sigma0(sigma0)
    assert null.r == 2 and "r=2" in repr(null)
    with pytest.raises(ValueError, match="null space is empty"):
        AlphaEditSystem(NullSpace.from_sigma0(sigma0 + 1e-3 * torch.eye(4, dtype=F64), 1e-4))
    for kwargs, match in [
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"alpha": -1.0}, "alpha"),
        ({"lam": -1.0, "full": True}, "lam"),
        ({"lam": 5.0}, "full=True"),
    ]:
        with pytest.raises(ValueError, match=match):
            AlphaEditSystem(null, **kwargs)
    with pytest.raises(ValueError, match="must all be < threshold"):
        NullSpace(null.U0, torch.tensor([0.0, 0.5], dtype=F64), 2e-2)
    with pytest.raises(ValueError, match="missing"):
        AlphaEditSystem.from_state_dict({"U0": null.U0})


# ---------------------------------------------------------------------------------------- PRUNE


@dataclass
class PruneCase:
    U: torch.Tensor
    V: torch.Tensor
    W: torch.Tensor

    @property
    def delta(self) -> torch.Tensor:
        return self.U @ self.V.T


@st.composite
def prune_cases(draw) -> PruneCase:
    d_out, d_in, n = draw(st.integers(1, 6)), draw(st.integers(1, 20)), draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    # σ_max(W) from ~0.01 to ~30 against σ(Δ) of a few units: from "all compressed" to "identity".
    w_scale = draw(st.sampled_from([0.003, 0.1, 0.5, 5.0]))
    return PruneCase(U=randn(gen, d_out, n), V=randn(gen, d_in, n), W=w_scale * randn(gen, d_out, d_in))


def expected_prune(delta: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The reference: full SVDs of W and Δ, U diag(s') Vᵀ."""
    s_star = torch.linalg.svdvals(W)[0]
    U, s, Vh = torch.linalg.svd(delta, full_matrices=False)
    s_new = torch.where(s > s_star, torch.log(s) - torch.log(s_star) + s_star, s)
    return (U * s_new) @ Vh


@PROPERTY
@given(c=prune_cases())
def test_prune_follows_the_formula_on_both_paths(c: PruneCase) -> None:
    delta = c.delta
    dense = prune(delta, c.W)
    factored = prune(delta, c.W, low_rank=(c.U, c.V))
    scale = max(1.0, torch.linalg.matrix_norm(delta, 2).item())
    assert (dense - factored).norm().item() / scale < 1e-10
    assert (dense - expected_prune(delta, c.W)).norm().item() / scale < 1e-10
    s_star = torch.linalg.matrix_norm(c.W, 2)
    s = torch.linalg.svdvals(delta)
    s_new = torch.where(s > s_star, torch.log(s) - torch.log(s_star) + s_star, s)
    torch.testing.assert_close(torch.linalg.svdvals(dense), s_new, rtol=1e-10, atol=1e-10 * scale)
    torch.testing.assert_close(prune(delta, c.W, sigma_max=s_star.item()), dense, rtol=0, atol=0)


@PROPERTY
@given(c=prune_cases())
def test_prune_is_the_identity_below_sigma_max(c: PruneCase) -> None:
    delta = c.delta
    W = c.W * (2 * torch.linalg.matrix_norm(delta, 2) / max(torch.linalg.matrix_norm(c.W, 2), 1e-300) + 1)
    assert prune(delta, W) is delta
    assert prune(delta, W, low_rank=(c.U, c.V)) is delta


def test_prune_errors() -> None:
    gen = torch.Generator().manual_seed(0)
    U, V, W = randn(gen, 3, 2), randn(gen, 5, 2), randn(gen, 3, 5)
    delta = U @ V.T
    with pytest.raises(ValueError, match="σ_max"):
        prune(delta, torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"W must have shape \[3, 5\]"):
        prune(delta, W.T)
    with pytest.raises(ValueError, match="low_rank U"):
        prune(delta, W, low_rank=(U.T, V))
    with pytest.raises(ValueError, match="low_rank V"):
        prune(delta, W, low_rank=(U, V[:, :1]))
    with pytest.raises(ValueError, match="does not factor delta"):
        prune(delta + 1.0, W, low_rank=(U, V))
    with pytest.raises(ValueError, match="pair"):
        prune(delta, W, low_rank=[U, V])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        prune(delta * float("nan"), W)


# ---------------------------------------------------------------------------------------- RECT


@st.composite
def rect_cases(draw) -> tuple[torch.Tensor, torch.Tensor, float]:
    d_out, d_in = draw(st.integers(1, 6)), draw(st.integers(1, 20))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    p = draw(st.sampled_from([1.0, 20.0, 40.0, 50.0, 99.5, 100.0]) | st.floats(0.5, 100.0))
    return randn(gen, d_out, d_in), randn(gen, d_out, d_in), p


@PROPERTY
@given(case=rect_cases())
def test_rect_keeps_the_top_percent_unchanged(case: tuple[torch.Tensor, torch.Tensor, float]) -> None:
    delta, W, p = case
    out = rect(delta, W, p)
    rho = delta.abs() / (W.abs() + 1e-8)
    kept = out != 0
    numel = delta.numel()
    k = math.floor(numel * (100 - p) / 100)
    # Random ρ are distinct: exactly the entries of rank ≥ k survive, i.e. p % plus one.
    assert int(kept.sum()) == (numel - k + 1 if k else numel)
    excess = int(kept.sum()) - numel * p / 100  # ≈ p %: one or two entries above the exact share
    assert 1 - 1e-9 <= excess < 2 or k == 0
    assert torch.equal(out[kept], delta[kept]) and (out[~kept] == 0).all()
    if kept.any() and (~kept).any():
        assert rho[kept].min() > rho[~kept].max()


@PROPERTY
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 20)),
    p=st.sampled_from([10.0, 20.0, 40.0, 75.0]),
)
def test_rect_ties_are_kept_together_and_order_does_not_matter(seed: int, shape: tuple[int, int], p: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randint(-2, 3, shape, generator=gen).to(F64)  # five values: many ties
    W = torch.ones(shape, dtype=F64)
    out = rect(delta, W, p)
    rho = delta.abs().flatten()
    k = math.floor(rho.numel() * (100 - p) / 100)
    tau = rho.sort().values[k - 1] if k else -math.inf
    assert torch.equal(out, torch.where(delta.abs() >= tau, delta, 0.0))
    perm = torch.randperm(delta.numel(), generator=gen)
    shuffled = rect(delta.flatten()[perm].reshape(shape), W, p)
    assert torch.equal(shuffled, out.flatten()[perm].reshape(shape))


def test_rect_errors_and_edges() -> None:
    delta, W = torch.ones(2, 3, dtype=F64), torch.ones(2, 3, dtype=F64)
    for p in (0.0, -5.0, 100.5, float("nan"), "a"):
        with pytest.raises(ValueError, match="top_percent"):
            rect(delta, W, p)
    with pytest.raises(ValueError, match=r"W must have shape \[2, 3\]"):
        rect(delta, torch.ones(3, 2, dtype=F64))
    assert rect(delta, W, 100.0) is delta
    # A zero weight is no division by zero (ρ = |Δ| / 1e-8); k = 2 of 4, so the top 50 % plus one stay.
    out = rect(torch.tensor([[4.0, 1.0, 3.0, 2.0]], dtype=F64), torch.zeros(1, 4, dtype=F64), 50.0)
    assert torch.equal(out, torch.tensor([[4.0, 0.0, 3.0, 2.0]], dtype=F64))


# ---------------------------------------------------------------------------------------- Algorithm 1


@dataclass
class EditProblem:
    sigma0: torch.Tensor
    lam: float
    ridge: float
    W0: torch.Tensor
    Ks: list[torch.Tensor]
    Vs: list[torch.Tensor]

    def system(self) -> LayerSystem:
        return LayerSystem(self.sigma0, self.lam, self.ridge)

    def one_time(self, t: int) -> torch.Tensor:
        """Unprocessed one-time solution of the first ``t`` batches: ``(W − W₀) A_t = B_t`` (LU)."""
        d = self.sigma0.shape[0]
        A = self.lam * self.sigma0 + self.ridge * torch.eye(d, dtype=F64)
        B = torch.zeros_like(self.W0)
        for K, V in zip(self.Ks[:t], self.Vs[:t]):
            A = A + K @ K.T
            B = B + (V - self.W0 @ K) @ K.T
        return self.W0 + torch.linalg.solve(A, B.T).T


@st.composite
def edit_problems(draw, n_batches: int = 4) -> EditProblem:
    d = draw(st.integers(2, 20))
    d_out = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    X = randn(gen, d, draw(st.integers(1, d + 4)))
    sizes = draw(st.lists(st.integers(0, 5), min_size=n_batches, max_size=n_batches))
    # A small W₀ makes PRUNE's σ* small, so it really compresses.
    w_scale = draw(st.sampled_from([0.01, 1.0]))
    return EditProblem(
        sigma0=X @ X.T / X.shape[1],
        lam=draw(st.floats(0.1, 10.0)),
        ridge=1.0,  # the _err variants' unit ridge (REFERENCE_NOTES §2.6)
        W0=w_scale * randn(gen, d_out, d),
        Ks=[randn(gen, d, n) for n in sizes],
        Vs=[randn(gen, d_out, n) for n in sizes],
    )


POSTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "rect20": rect,
    "rect40": lambda delta, W: rect(delta, W, 40.0),
    "prune": prune,
    "identity": lambda delta, W: delta,
    "halve": lambda delta, W: delta / 2,
}


def run_algorithm_1(p: EditProblem, post, *, compensate: bool) -> list[float]:
    """Relative gap between ``W_{t−1} + Δ_t`` and the one-time solution after each step."""
    system, ec = p.system(), ErrorCompensation(p.W0.shape[0], p.W0.shape[1])
    W, gaps = p.W0, []
    for t, (K, V) in enumerate(zip(p.Ks, p.Vs), start=1):
        R = V - W @ K
        if compensate:
            applied, raw = ec.step(system, K, R, W, post)
        else:  # the "no error correction" ablation (REFERENCE_NOTES §2.7)
            raw = system.update(K, R)
            applied = post(raw, W)
        ote = p.one_time(t)
        scale = max((ote - p.W0).norm().item(), (W - p.W0).norm().item(), 1e-300)
        gaps.append((W + raw - ote).norm().item() / scale)
        W = W + applied
    return gaps


@PROPERTY
@given(p=edit_problems(), post=st.sampled_from(sorted(POSTS)))
def test_compensated_step_equals_one_time_solution(p: EditProblem, post: str) -> None:
    assert max(run_algorithm_1(p, POSTS[post], compensate=True)) < 1e-9


def test_dropping_e_breaks_the_invariant() -> None:
    """REFERENCE_NOTES §2.10: without E the gap to OTE is O(1); with E it is rounding."""
    gen = torch.Generator().manual_seed(7)
    d, d_out = 12, 4
    X = randn(gen, d, 16)
    p = EditProblem(
        sigma0=X @ X.T / 16, lam=1.0, ridge=1.0, W0=randn(gen, d_out, d),
        Ks=[randn(gen, d, 3) for _ in range(4)], Vs=[randn(gen, d_out, 3) for _ in range(4)],
    )  # fmt: skip
    with_e = run_algorithm_1(p, rect, compensate=True)
    without_e = run_algorithm_1(p, rect, compensate=False)
    assert max(with_e) < 1e-9
    assert without_e[0] < 1e-12  # the first step has no earlier distortion to carry
    assert max(without_e[1:]) > 0.1


@PROPERTY
@given(p=edit_problems(n_batches=2))
def test_e_is_zero_exactly_when_post_changes_nothing(p: EditProblem) -> None:
    system, ec = p.system(), ErrorCompensation(p.W0.shape[0], p.W0.shape[1])
    K, V = p.Ks[0], p.Vs[0]
    applied, raw = ec.step(system, K, V - p.W0 @ K, p.W0, POSTS["identity"])
    assert ec.is_zero and applied is raw and torch.equal(ec.E, torch.zeros_like(p.W0))
    W = p.W0 + applied
    K, V = p.Ks[1], p.Vs[1]
    applied, raw = ec.step(system, K, V - W @ K, W, POSTS["halve"])
    torch.testing.assert_close(ec.E, (applied - raw) @ system.A, rtol=0, atol=0)
    assert ec.is_zero == (raw == 0).all().item()


@PROPERTY
@given(p=edit_problems(n_batches=3))
def test_error_compensation_state_dict_round_trip(p: EditProblem) -> None:
    system, ec = p.system(), ErrorCompensation(p.W0.shape[0], p.W0.shape[1])
    W = p.W0
    K, V = p.Ks[0], p.Vs[0]
    W = W + ec.step(system, K, V - W @ K, W, rect)[0]
    twin_system = LayerSystem.from_state_dict(system.state_dict())
    twin = ErrorCompensation.from_state_dict(ec.state_dict())
    assert ("E" in ec.state_dict()) == (not ec.is_zero)
    for K, V in zip(p.Ks[1:], p.Vs[1:]):
        R = V - W @ K
        a1, r1 = ec.step(system, K, R, W, rect)
        a2, r2 = twin.step(twin_system, K, R, W, rect)
        assert torch.equal(a1, a2) and torch.equal(r1, r2)
        W = W + a1
    assert torch.equal(ec.E, twin.E)


def test_failed_step_leaves_system_and_e_unchanged() -> None:
    gen = torch.Generator().manual_seed(3)
    d, d_out = 6, 2
    system = LayerSystem(torch.eye(d, dtype=F64), 1.0, 1.0)
    ec = ErrorCompensation(d_out, d)
    W = randn(gen, d_out, d)
    K, R = randn(gen, d, 2), randn(gen, d_out, 2)
    W = W + ec.step(system, K, R, W, rect)[0]
    A, n, E = system.A, system.n_constraints, ec.E

    def boom(delta: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("post failed")

    K2, R2 = randn(gen, d, 1), randn(gen, d_out, 1)
    bad = [
        ((system, K2, R2, W, boom), RuntimeError, "post failed"),
        ((system, K2, R2, W, lambda delta, W: delta.T), ValueError, r"post\(Δ, W\) must have shape \[2, 6\]"),
        ((system, K2, R2, W, lambda delta, W: delta * math.nan), ValueError, "NaN"),
        ((system, K2, R2, W, "rect"), ValueError, "callable"),
        ((system, K2[:-1], R2, W, rect), ValueError, r"K must have shape \[6, \?\]"),
        ((system, K2, R2.T, W, rect), ValueError, r"R must have shape \[2, 1\]"),
        ((system, K2, R2, W.T, rect), ValueError, r"W must have shape \[2, 6\]"),
        ((LayerSystem(torch.eye(5, dtype=F64), 1.0), K2, R2, W, rect), ValueError, "d_in=5"),
        ((None, K2, R2, W, rect), ValueError, "LayerSystem"),
    ]
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            ec.step(*args)
        assert system.A is A and system.n_constraints == n and torch.equal(ec.E, E)
    for args in [(0, 3), (2, 1.5), (True, 2)]:
        with pytest.raises(ValueError, match="int ≥ 1"):
            ErrorCompensation(*args)
