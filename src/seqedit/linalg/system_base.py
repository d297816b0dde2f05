"""The update skeleton shared by ``LayerSystem`` and ``AlphaEditSystem``.

Both keep a Gram-type SPD matrix ``G: [p, p]`` of the edit keys in force (``p = d_in``, or ``r`` in a
null-space basis) and answer a step that adds the keys ``K_add`` and removes ``K_remove`` by one solve
with ``G_new = G + K_add K_addᵀ − K_remove K_removeᵀ``. ``GramSystem`` validates the step's columns,
forms ``G_new`` and the constraint count, and provides ``copy()``; each subclass factorises and solves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from seqedit.errors import IllConditionedError
from seqedit.linalg.checks import matrix
from seqedit.linalg.solvers import symmetrize

_S = TypeVar("_S", bound="GramSystem")


@contextmanager
def hinted(hint: str) -> Iterator[None]:
    """Re-raise an ``IllConditionedError`` with ``hint`` (what the caller can do about it) appended."""
    try:
        yield
    except IllConditionedError as e:
        raise IllConditionedError(f"{e}; {hint}") from None


def _edit_columns(
    d_in: int,
    device: torch.device,
    K_add: Tensor | None,
    R_add: Tensor | None,
    K_remove: Tensor | None,
    R_remove: Tensor | None,
) -> tuple[Tensor, Tensor, int]:
    """``K = [K_add | K_remove]: [d_in, n+m]``, ``R = [R_add | −R_remove]: [d_out, n+m]`` and ``n``.

    Removing a fact is adding it with the opposite residual sign, while its key leaves the Gram
    matrix (the caller splits ``K`` at column ``n`` for that).
    """
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for which, K, R in (("add", K_add, R_add), ("remove", K_remove, R_remove)):
        if K is None and R is None:
            continue
        if K is None or R is None:
            raise ValueError(f"K_{which} and R_{which} must both be given or both be None")
        K = matrix(K, f"K_{which}", d_in, None, device)
        pairs[which] = (K, matrix(R, f"R_{which}", None, K.shape[1], device))
    if not pairs:
        raise ValueError("update needs K_add/R_add, K_remove/R_remove, or both")
    d_outs = sorted({R.shape[0] for _, R in pairs.values()})
    if len(d_outs) > 1:
        raise ValueError(f"R_add and R_remove disagree on d_out: {d_outs}")
    f64 = {"dtype": torch.float64, "device": device}
    none = (torch.empty(d_in, 0, **f64), torch.empty(d_outs[0], 0, **f64))
    Ka, Ra = pairs.get("add", none)
    Kr, Rr = pairs.get("remove", none)
    return torch.cat([Ka, Kr], dim=1), torch.cat([Ra, -Rr], dim=1), Ka.shape[1]


def _gram_update(G: Tensor, n_in_force: int, Ka: Tensor, Kr: Tensor) -> tuple[Tensor, int]:
    """``(sym(G + Ka Kaᵀ − Kr Krᵀ), n_in_force + #Ka − #Kr)`` for a Gram-type matrix ``G: [p, p]``;
    ``G`` itself is never modified. Raises ``ValueError`` if more constraints would leave than are in
    force (the state is untouched then)."""
    n_new = n_in_force + Ka.shape[1] - Kr.shape[1]
    if n_new < 0:
        raise ValueError(f"cannot remove {Kr.shape[1]} constraints: only {n_in_force + Ka.shape[1]} would be in force")
    G_new = torch.addmm(G, Ka, Ka.mT)
    G_new.addmm_(Kr, Kr.mT, alpha=-1)  # in place on the fresh tensor only
    return symmetrize(G_new), n_new


@dataclass(frozen=True)
class EditStep:
    """One validated step, not yet committed.

    ``K: [d_in, n+m]`` (added then removed keys), ``R: [d_out, n+m]`` (their residuals, the removed
    ones negated), ``Kc: [p, n+m]`` (the keys in the system's coordinates), ``n_add = n``, and the
    ``gram: [p, p]`` and ``n_constraints`` the step leads to.
    """

    K: Tensor
    R: Tensor
    Kc: Tensor
    n_add: int
    gram: Tensor
    n_constraints: int

    @property
    def added(self) -> Tensor:
        """``[p, n]``: the added keys in the system's coordinates."""
        return self.Kc[:, : self.n_add]

    @property
    def removed(self) -> Tensor:
        """``[p, m]``: the removed keys in the system's coordinates."""
        return self.Kc[:, self.n_add :]

    @property
    def empty(self) -> bool:
        """True for a step with no key columns (its update is 0)."""
        return self.K.shape[1] == 0

    def hint(self, gram_name: str) -> str:
        """What to say when the factorisation of ``gram`` (called ``gram_name``) fails."""
        n_rem = self.K.shape[1] - self.n_add
        return (
            f"the update (+{self.n_add}/−{n_rem} keys) would leave {gram_name} without a positive definite "
            "factorisation (removed keys must be keys in force); state unchanged"
        )


class GramSystem(ABC):
    """Base of the systems that keep the Gram-type matrix of the edit keys in force (see the module).

    Subclasses keep ``_n`` (the key columns in force) and ``_lam`` (λ), and replace their tensors
    rather than modifying them, which is what makes ``copy()`` a shallow copy.
    """

    _n: int
    _lam: float

    @property
    @abstractmethod
    def d_in(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    def lam(self) -> float:
        """λ ≥ 0, the weight of Σ₀ in the Gram matrix (for AlphaEdit, only with ``full=True``)."""
        return self._lam

    @property
    def n_constraints(self) -> int:
        """Number of key columns in the accumulated Gram matrix (added minus removed; steps that do not
        accumulate add none)."""
        return self._n

    def _prepare(
        self,
        gram: Tensor,
        K_add: Tensor | None,
        R_add: Tensor | None,
        K_remove: Tensor | None,
        R_remove: Tensor | None,
        basis: Tensor | None = None,
    ) -> EditStep:
        """Validate a step and form ``gram + Kc_add Kc_addᵀ − Kc_rem Kc_remᵀ`` without committing it.

        ``gram: [p, p]``; ``basis: [d_in, p]`` maps the keys to ``Kc = basisᵀ K`` (``None``: ``Kc = K``).
        """
        K, R, n_add = _edit_columns(self.d_in, self.device, K_add, R_add, K_remove, R_remove)
        Kc = K if basis is None else basis.mT @ K
        gram_new, n_new = _gram_update(gram, self._n, Kc[:, :n_add], Kc[:, n_add:])
        return EditStep(K, R, Kc, n_add, gram_new, n_new)

    def _restore_count(self, state: Mapping[str, Any]) -> None:
        n = int(state["n_constraints"])
        if n < 0:
            raise ValueError(f"state['n_constraints'] must be ≥ 0, got {n}")
        self._n = n

    def copy(self: _S) -> _S:
        """An independent system with the same state (tensors are shared: they are never mutated)."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new
