"""Properties of seqedit.linalg: sequential editing equals the one-time solution (DESIGN §2)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqedit.errors import IllConditionedError
from seqedit.linalg import (
    SOLVERS,
    ConditioningWarning,
    LayerSystem,
    cho_solve,
    cholesky_factor,
    condition_estimate,
    inverse_from_factor,
    woodbury_downdate,
    woodbury_update,
)

F64 = torch.float64
PROPERTY = settings(max_examples=40, deadline=None)
BOTH_SOLVERS = pytest.mark.parametrize("solver", SOLVERS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Matrices here are tiny: extra threads only add start-up cost and oversubscribe busy machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Problem:
    sigma0: torch.Tensor
    lam: float
    ridge: float
    W0: torch.Tensor
    Ks: list[torch.Tensor]
    Vs: list[torch.Tensor]

    def system(self, solver: str = "cholesky", reanchor_every: int = 2) -> LayerSystem:
        """Re-anchoring every 2nd update exercises both Woodbury steps and anchors."""
        return LayerSystem(self.sigma0, self.lam, self.ridge, solver=solver, reanchor_every=reanchor_every)

    def one_time(self, batches: list[int]) -> torch.Tensor:
        """W₀ + B A⁻¹ for the given batches, solved independently (LU) as the reference."""
        d = self.sigma0.shape[0]
        A = self.lam * self.sigma0 + self.ridge * torch.eye(d, dtype=F64)
        B = torch.zeros_like(self.W0)
        for i in batches:
            A = A + self.Ks[i] @ self.Ks[i].T
            B = B + (self.Vs[i] - self.W0 @ self.Ks[i]) @ self.Ks[i].T
        return self.W0 + torch.linalg.solve(A, B.T).T


def random_sigma0(gen: torch.Generator, d: int, rank: int) -> torch.Tensor:
    X = torch.randn(d, rank, generator=gen, dtype=F64)
    return X @ X.T / rank


@st.composite
def problems(draw, n_batches: int = 3) -> Problem:
    d = draw(st.integers(2, 24))
    d_out = draw(st.integers(1, 8))
    deficient = draw(st.booleans())
    # A rank-deficient Σ₀ needs a ridge to keep A positive definite before any key is added.
    rank = draw(st.integers(1, d - 1)) if deficient else draw(st.integers(d + 2, d + 8))
    ridge = draw(st.sampled_from([0.1, 1.0] if deficient else [0.0, 0.1, 1.0]))
    lam = draw(st.floats(0.1, 10.0))
    sizes = draw(st.lists(st.integers(0, 6), min_size=n_batches, max_size=n_batches))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    return Problem(
        sigma0=random_sigma0(gen, d, rank),
        lam=lam,
        ridge=ridge,
        W0=torch.randn(d_out, d, generator=gen, dtype=F64),
        Ks=[torch.randn(d, n, generator=gen, dtype=F64) for n in sizes],
        Vs=[torch.randn(d_out, n, generator=gen, dtype=F64) for n in sizes],
    )


def add(system: LayerSystem, W: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return W + system.update(K, V - W @ K)


def remove(system: LayerSystem, W: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return W + system.update(None, None, K, V - W @ K)


def add_all(system: LayerSystem, p: Problem) -> torch.Tensor:
    W = p.W0
    for K, V in zip(p.Ks, p.Vs):
        W = add(system, W, K, V)
    return W


def rel_err(W: torch.Tensor, W_ref: torch.Tensor, W0: torch.Tensor, *visited: torch.Tensor) -> float:
    """Error relative to the largest edit made on the way (``visited``: intermediate weights);
    rounding scales with those edits, not with ``W₀``."""
    scale = max((X - W0).norm().item() for X in (W_ref, *visited))
    err = (W - W_ref).norm().item()
    return err / scale if scale > 0 else err


# ---------------------------------------------------------------------------- SE ≡ OTE


@BOTH_SOLVERS
@PROPERTY
@given(p=problems(n_batches=4))
def test_sequential_equals_one_time(solver: str, p: Problem) -> None:
    system = p.system(solver)
    W = add_all(system, p)
    assert rel_err(W, p.one_time([0, 1, 2, 3]), p.W0) < 1e-10
    assert system.n_constraints == sum(K.shape[1] for K in p.Ks)


@BOTH_SOLVERS
@PROPERTY
@given(p=problems(n_batches=3))
def test_removing_a_batch_equals_one_time_of_the_rest(solver: str, p: Problem) -> None:
    system = p.system(solver)
    W_all = add_all(system, p)
    W = remove(system, W_all, p.Ks[1], p.Vs[1])
    assert rel_err(W, p.one_time([0, 2]), p.W0, W_all) < 1e-10
    assert system.n_constraints == p.Ks[0].shape[1] + p.Ks[2].shape[1]


@BOTH_SOLVERS
@PROPERTY
@given(p=problems(n_batches=1))
def test_add_then_remove_restores_w0_and_a(solver: str, p: Problem) -> None:
    system = p.system(solver)
    A0 = system.A.clone()
    W_added = add_all(system, p)
    W = remove(system, W_added, p.Ks[0], p.Vs[0])
    assert rel_err(W, p.W0, p.W0, W_added) < 1e-10
    torch.testing.assert_close(system.A, A0, rtol=1e-12, atol=1e-12 * A0.abs().max().item())
    assert system.n_constraints == 0


@PROPERTY
@given(p=problems(n_batches=3), reanchor_every=st.integers(1, 4))
def test_woodbury_and_cholesky_give_the_same_delta(p: Problem, reanchor_every: int) -> None:
    chol = p.system("cholesky")
    wood = p.system("woodbury", reanchor_every=reanchor_every)
    W = p.W0
    steps = [(i, +1) for i in range(3)] + [(1, -1), (1, +1), (0, -1)]
    for i, sign in steps:
        K, R = p.Ks[i], p.Vs[i] - W @ p.Ks[i]
        args = (K, R) if sign > 0 else (None, None, K, R)
        d_chol, d_wood = chol.update(*args), wood.update(*args)
        assert (d_wood - d_chol).norm() <= 1e-8 * d_chol.norm() + 1e-300
        W = W + d_chol


@BOTH_SOLVERS
@PROPERTY
@given(p=problems(n_batches=2), same_key=st.booleans(), data=st.data())
def test_replacing_a_fact_in_one_update_equals_one_time(
    solver: str, p: Problem, same_key: bool, data: st.DataObject
) -> None:
    K2, V2 = p.Ks[1], p.Vs[1]
    if K2.shape[1] == 0:
        return
    j = data.draw(st.integers(0, K2.shape[1] - 1))
    gen = torch.Generator().manual_seed(j)
    k_new = K2[:, j : j + 1] if same_key else torch.randn(K2.shape[0], 1, generator=gen, dtype=F64)
    v_new = torch.randn(V2.shape[0], 1, generator=gen, dtype=F64)

    system = p.system(solver)
    W = add(system, add(system, p.W0, p.Ks[0], p.Vs[0]), K2, V2)
    k_old, v_old = K2[:, j : j + 1], V2[:, j : j + 1]
    W_before = W
    W = W + system.update(k_new, v_new - W @ k_new, k_old, v_old - W @ k_old)

    keep = [c for c in range(K2.shape[1]) if c != j]
    final = Problem(
        p.sigma0, p.lam, p.ridge, p.W0,
        [p.Ks[0], torch.cat([K2[:, keep], k_new], 1)],
        [p.Vs[0], torch.cat([V2[:, keep], v_new], 1)],
    )  # fmt: skip
    assert rel_err(W, final.one_time([0, 1]), p.W0, W_before) < 1e-10
    assert system.n_constraints == p.Ks[0].shape[1] + K2.shape[1]


# ---------------------------------------------------------------------------- failures


def test_zero_lam_and_ridge_is_singular() -> None:
    with pytest.raises(IllConditionedError, match=r"4×4.*pivot 1.*ridge"):
        LayerSystem(torch.eye(4, dtype=F64), lam=0.0)


@PROPERTY
@given(d=st.integers(2, 24), data=st.data())
def test_rank_deficient_sigma0_without_ridge_is_singular(d: int, data: st.DataObject) -> None:
    rank = data.draw(st.integers(1, d - 1))
    lam = data.draw(st.floats(0.1, 10.0))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    with pytest.raises(IllConditionedError, match=r"raise lam or add a ridge"):
        LayerSystem(random_sigma0(gen, d, rank), lam)


@BOTH_SOLVERS
@pytest.mark.parametrize("reanchor_every", [1, 100])
def test_failed_update_leaves_state_unchanged(solver: str, reanchor_every: int) -> None:
    gen = torch.Generator().manual_seed(0)
    d, d_out = 12, 5
    sigma0 = random_sigma0(gen, d, 20)
    K1, K2 = torch.randn(d, 3, generator=gen, dtype=F64), torch.randn(d, 2, generator=gen, dtype=F64)
    R1, R2 = torch.randn(d_out, 3, generator=gen, dtype=F64), torch.randn(d_out, 2, generator=gen, dtype=F64)
    bad = 100 * torch.randn(d, 1, generator=gen, dtype=F64)  # never added: A − bad badᵀ is indefinite

    def fresh() -> LayerSystem:
        s = LayerSystem(sigma0, 1.0, 0.1, solver=solver, reanchor_every=reanchor_every)
        s.update(K1, R1)
        return s

    system = fresh()
    A_before = system.A.clone()
    with pytest.raises(IllConditionedError, match="state unchanged"):
        system.update(K2, R2, bad, torch.ones(d_out, 1, dtype=F64))
    with pytest.raises(ValueError, match="K_add"):
        system.update(K2[:-1], R2)
    assert torch.equal(system.A, A_before)
    assert system.n_constraints == 3
    reference = fresh()
    assert torch.equal(system.update(K2, R2), reference.update(K2, R2))
    assert torch.equal(system.A, reference.A)


def _sys(**kw) -> LayerSystem:
    return LayerSystem(torch.eye(3, dtype=F64), 1.0, **kw)


K3, R2x3 = torch.ones(3, 2, dtype=F64), torch.ones(2, 2, dtype=F64)

BAD_CONSTRUCTION = [
    (lambda: LayerSystem(torch.zeros(3, 4), 1.0), "square"),
    (lambda: LayerSystem(torch.zeros(2, 3, 3), 1.0), r"sigma0 must have shape"),
    (lambda: LayerSystem(torch.zeros(0, 0), 1.0), "non-empty square"),
    (lambda: LayerSystem([[1.0]], 1.0), "sigma0 must be a torch.Tensor"),
    (lambda: LayerSystem(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), 1.0), "not symmetric"),
    (lambda: LayerSystem(torch.tensor([[float("nan")]]), 1.0), "NaN"),
    (lambda: LayerSystem(torch.eye(3), -1.0), "lam"),
    (lambda: LayerSystem(torch.eye(3), float("nan")), "lam"),
    (lambda: _sys(ridge=-0.5), "ridge"),
    (lambda: _sys(solver="lu"), "unknown solver"),
    (lambda: _sys(reanchor_every=0), "reanchor_every"),
    (lambda: _sys(cond_warn=0), "cond_warn"),
]
BAD_CALLS = [
    (lambda s: s.update(torch.ones(4, 2), R2x3), "K_add"),
    (lambda s: s.update(K3, torch.ones(2, 3)), "R_add"),
    (lambda s: s.update(K3, None), "both"),
    (lambda s: s.update(None, None), "needs"),
    (lambda s: s.update(K3, R2x3, K3, torch.ones(4, 2)), "d_out"),
    (lambda s: s.update(K3, R2x3 * float("inf")), "NaN or infinite"),
    (lambda s: s.update(None, None, K3, R2x3), "cannot remove"),
    (lambda s: s.solve_right(torch.ones(2, 4)), "B"),
]


@pytest.mark.parametrize(("make", "message"), BAD_CONSTRUCTION)
def test_bad_construction_raises_value_error(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(("call", "message"), BAD_CALLS)
def test_bad_calls_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(_sys())


def test_ill_conditioned_sigma0_warns() -> None:
    with pytest.warns(ConditioningWarning, match="cond_warn"):
        LayerSystem(torch.diag(torch.tensor([1.0, 1e-8], dtype=F64)), 1.0, cond_warn=1e6)


# ---------------------------------------------------------------------------- state


@BOTH_SOLVERS
@settings(max_examples=10, deadline=None)
@given(p=problems(n_batches=3))
def test_state_dict_round_trip_is_identical(solver: str, p: Problem) -> None:
    from safetensors.torch import load, save

    system = p.system(solver, reanchor_every=5)
    W = add(system, add(system, p.W0, p.Ks[0], p.Vs[0]), p.Ks[1], p.Vs[1])
    state = system.state_dict()
    # As a ledger would store it: tensors in safetensors, the rest in JSON.
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = json.loads(json.dumps({k: v for k, v in state.items() if k not in tensors}))
    restored = LayerSystem.from_state_dict({**load(save(tensors)), **scalars})
    copied = system.copy()

    R = p.Vs[2] - W @ p.Ks[2]
    expected = system.update(p.Ks[2], R)
    for other in (restored, copied):
        assert other.n_constraints == system.n_constraints - p.Ks[2].shape[1]
        assert torch.equal(other.update(p.Ks[2], R), expected)
        assert torch.equal(other.A, system.A)
        assert torch.equal(other.solve_right(W), system.solve_right(W))


def test_copy_is_independent() -> None:
    system = _sys()
    twin = system.copy()
    system.update(K3, R2x3)
    assert twin.n_constraints == 0
    assert torch.equal(twin.A, torch.eye(3, dtype=F64))


def test_from_state_dict_rejects_incomplete_state() -> None:
    state = _sys(solver="woodbury").state_dict()
    with pytest.raises(ValueError, match="missing 'C'"):
        LayerSystem.from_state_dict({k: v for k, v in state.items() if k != "C"})
    with pytest.raises(ValueError, match="lam"):
        LayerSystem.from_state_dict({k: v for k, v in state.items() if k != "lam"})


@BOTH_SOLVERS
def test_solve_right_and_zero_width_update(solver: str) -> None:
    gen = torch.Generator().manual_seed(1)
    sigma0 = random_sigma0(gen, 10, 14)
    system = LayerSystem(sigma0, 2.0, 0.5, solver=solver)
    B = torch.randn(3, 10, generator=gen, dtype=F64)
    A = 2.0 * sigma0 + 0.5 * torch.eye(10, dtype=F64)
    torch.testing.assert_close(system.solve_right(B) @ A, B, rtol=0, atol=1e-12)
    delta = system.update(torch.empty(10, 0), torch.empty(4, 0))
    assert torch.equal(delta, torch.zeros(4, 10, dtype=F64))
    assert system.n_constraints == 0


# ---------------------------------------------------------------------------- solvers


@st.composite
def spd_matrices(draw) -> torch.Tensor:
    d = draw(st.integers(1, 24))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    spectrum = torch.logspace(0, -draw(st.floats(0, 10)), d, dtype=F64)
    return (Q * spectrum) @ Q.T


@PROPERTY
@given(A=spd_matrices())
def test_cholesky_factor_solve_and_condition_estimate(A: torch.Tensor) -> None:
    L = cholesky_factor(A)
    assert torch.equal(L, L.tril())
    torch.testing.assert_close(L @ L.T, A, rtol=0, atol=1e-13)
    B = torch.randn(A.shape[0], 3, dtype=F64)
    X = cho_solve(L, B)
    assert (A @ X - B).norm() <= 1e-13 * torch.linalg.cond(A) * B.norm()
    true = torch.linalg.cond(A).item()
    est = condition_estimate(L)
    assert true / 10 <= est <= true * (1 + 1e-6)


def test_cholesky_factor_names_size_and_pivot() -> None:
    with pytest.raises(IllConditionedError, match=r"3×3.*pivot 2 of 3"):
        cholesky_factor(torch.diag(torch.tensor([1.0, -1.0, 1.0])))
    with pytest.raises(IllConditionedError, match=r"2×2.*condition estimate 1e\+20"):
        cholesky_factor(torch.diag(torch.tensor([1.0, 1e-20], dtype=F64)), max_cond=1e14)
    with pytest.raises(ValueError, match="square"):
        cholesky_factor(torch.ones(2, 3))


@PROPERTY
@given(A=spd_matrices(), n=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_woodbury_update_and_downdate_match_direct_inverse(A: torch.Tensor, n: int, seed: int) -> None:
    A = A + torch.eye(A.shape[0], dtype=F64)  # keep the inverse accurate to compare entrywise
    K = torch.randn(A.shape[0], n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    C = inverse_from_factor(cholesky_factor(A))
    C_up = woodbury_update(C, K)
    torch.testing.assert_close(C_up, torch.linalg.inv(A + K @ K.T), rtol=0, atol=1e-11)
    assert torch.equal(C_up, C_up.T)
    torch.testing.assert_close(woodbury_downdate(C_up, K), C, rtol=0, atol=1e-10)
    k = 2 * K[:, :1] / K[:, :1].norm()  # ‖k‖² = 4 > 2 ≥ λ_max(A): kᵀ(A − k kᵀ)k < 0
    with pytest.raises(IllConditionedError, match="capacitance"):
        woodbury_downdate(C, k)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_unmet_share_is_the_undone_part_of_the_asked_change(d_out: int, d_in: int, n: int, seed: int, t: float) -> None:
    from seqedit.linalg.fit import unmet_share

    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    V = W0 @ K + R
    # weights that deliver the fraction t of every asked change along the keys
    W = W0 + t * R @ torch.linalg.pinv(K)
    share = unmet_share(W, W0, K, V)
    if n <= d_in:  # the keys are independent (almost surely): W k_i − v_i = −(1 − t) r_i exactly
        torch.testing.assert_close(share, torch.full((n,), 1 - t, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unmet_share(W0, W0, K, V), torch.ones(n, dtype=torch.float64))
    assert bool((share >= 0).all())


def test_unmet_share_of_a_column_asking_nothing_and_bad_shapes() -> None:
    from seqedit.linalg.fit import unmet_share

    W0 = torch.eye(2, dtype=torch.float64)
    K = torch.eye(2, dtype=torch.float64)
    assert unmet_share(W0, W0, K, K).tolist() == [0.0, 0.0]
    assert unmet_share(2 * W0, W0, K, K).tolist() == [float("inf")] * 2
    with pytest.raises(ValueError, match="do not fit"):
        unmet_share(W0, W0, K, torch.zeros(3, 2))
