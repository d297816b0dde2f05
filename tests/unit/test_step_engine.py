"""The one step engine (``step_engine.solve_layers``): a ledger and a ledger-free run execute the same
float operations, so with float64 storage their weights are bitwise equal, step after step; the column
source is told exactly one of residuals and targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqedit import Editor
from seqedit.datasets import load_facts
from seqedit.shared_data import counterfact_path
from seqedit.step_engine import solve_layers
from seqedit.testing import tiny_model

HP = dict(layers=(1, 2), stats_tokens=2000, v_steps=3, lam=10.0)


def _masters(editor: Editor) -> dict[int, torch.Tensor]:
    return {layer: w.clone() for layer, w in editor.master.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_ledger_and_a_ledger_free_run_are_bitwise_equal(tmp_path: Path, family: str) -> None:
    facts = load_facts(counterfact_path(), limit=6)
    free = Editor(tiny_model(family), **HP)
    kept = Editor(tiny_model(family), ledger=tmp_path / "L", kv_dtype="float64", **HP)
    for lo in range(0, 6, 2):
        a = free.apply(facts[lo:lo + 2])
        b = kept.apply(facts[lo:lo + 2])
        assert a.value_steps == b.value_steps and a.residual_norms == b.residual_norms
        for layer in HP["layers"]:
            assert torch.equal(free.master[layer], kept.master[layer]), (lo, layer)
            assert torch.equal(free.loaded.adapter.weight(layer), kept.loaded.adapter.weight(layer))
    assert kept.verify().ok
    kept.close()


def test_apply_kv_with_and_without_a_ledger_is_bitwise_equal(tmp_path: Path) -> None:
    free = Editor(tiny_model("llama"), **HP)
    kept = Editor(tiny_model("llama"), ledger=tmp_path / "L", kv_dtype="float64", **HP)
    free.prepare()
    kept.prepare()
    d_out, d_in = free.master[1].shape
    gen = torch.Generator().manual_seed(0)
    facts = load_facts(counterfact_path(), limit=4)
    for lo in (0, 2):
        K = {l: torch.randn(d_in, 2, generator=gen, dtype=torch.float64) for l in HP["layers"]}
        R = {l: torch.randn(d_out, 2, generator=gen, dtype=torch.float64) for l in HP["layers"]}
        out_free = free.apply_kv(K, R=R)
        out_kept = kept.apply_kv(K, R=R, facts=facts[lo:lo + 2])
        for layer in HP["layers"]:
            assert torch.equal(out_free[layer], out_kept[layer])
    assert all(torch.equal(a, b) for a, b in zip(_masters(free).values(), _masters(kept).values()))
    kept.close()


def test_the_column_source_gives_exactly_one_of_residuals_and_targets() -> None:
    editor = Editor(tiny_model("llama"), **HP)
    editor.prepare()
    d_out, d_in = editor.master[1].shape
    K = torch.zeros(d_in, 1, dtype=torch.float64)
    before = _masters(editor)
    for bad in ((K, None, None), (K, torch.zeros(d_out, 1), torch.zeros(d_out, 1))):
        with pytest.raises(ValueError, match="exactly one of residuals and targets"):
            with editor.bank.transaction():
                solve_layers(editor.bank, None, HP["layers"], lambda i, layer, bad=bad: bad)
    assert all(torch.equal(before[l], editor.master[l]) for l in HP["layers"])  # the transaction rolled back
