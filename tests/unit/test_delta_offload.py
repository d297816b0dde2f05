"""apply_delta on an accelerate-offloaded model: CPU-offloaded parameters (on ``meta``, their values in
the hook's host copy) take the delta there; a disk-offloaded one is refused, with the reason, before
any delta is read or any weight written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from ledger_helpers import apply_facts, fact, make_editor

import seqedit
from seqedit.errors import PlacementError
from seqedit.models.load import as_loaded
from seqedit.models.placement import HOST, read_param
from seqedit.testing import tiny_model


def _logits(lm) -> torch.Tensor:
    ids = lm.tokenizer("Place 0 is located in", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.fixture
def delta(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A delta export of two facts on the tiny llama, and the edited model's logits."""
    lm = tiny_model("llama")
    ed = make_editor(tmp_path / "L", lm=lm)
    apply_facts(ed, [fact(0), fact(1)])
    ed.export(tmp_path / "delta", delta=True, delta_dtype="float64")
    ed.close()
    return tmp_path / "delta", _logits(lm)


def test_a_cpu_offloaded_model_takes_the_delta_in_its_offloaded_copy(delta) -> None:
    path, edited = delta
    other = tiny_model("llama")
    lm = as_loaded(cpu_offload(other.model, execution_device=HOST), other.tokenizer)
    assert lm.adapter.ffn_out(1).weight.is_meta
    before = read_param(lm.adapter.ffn_out(1)).clone()
    seqedit.apply_delta(lm, path)
    assert not torch.equal(read_param(lm.adapter.ffn_out(1)), before)
    torch.testing.assert_close(_logits(lm), edited, rtol=1e-5, atol=1e-6)


def test_a_disk_offloaded_edited_layer_is_refused_before_anything_is_written(delta, tmp_path: Path) -> None:
    path, _ = delta
    other = tiny_model("llama")
    layers = other.adapter.spec.layers
    # block 2 (an edited one) on disk, the rest on the CPU; block 1 is listed first, so a write there
    # before the refusal would show
    dm = {f"{layers}.{i}": "disk" if i == 2 else "cpu" for i in range(other.adapter.n_layers)}
    parent = layers.rsplit(".", 1)[0]
    dm |= {f"{parent}.{n}": "cpu" for n, _ in other.model.get_submodule(parent).named_children()
           if f"{parent}.{n}" != layers}
    dm |= {n: "cpu" for n, _ in other.model.named_children() if n != parent.split(".")[0]}
    model = dispatch_model(other.model, dm, offload_dir=str(tmp_path / "off"), force_hooks=True)
    lm = as_loaded(model, other.tokenizer)
    before = {n: read_param(m).clone() for n, m in (("1", lm.adapter.ffn_out(1)), ("2", lm.adapter.ffn_out(2)))}
    logits = _logits(lm)
    with pytest.raises(PlacementError, match=r"mlp\.down_proj\.weight is offloaded to disk: an edit written there"):
        seqedit.apply_delta(lm, path)
    assert torch.equal(read_param(lm.adapter.ffn_out(1)), before["1"])
    assert torch.equal(read_param(lm.adapter.ffn_out(2)), before["2"])
    assert torch.equal(_logits(lm), logits)
