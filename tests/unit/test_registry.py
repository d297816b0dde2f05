"""Extending seqedit from outside the package: a toy method and a toy architecture, registered through
the public API only, run through the editor, the ledger and the evaluation plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import seqedit
from seqedit import ArchSpec, Capabilities, Editor, Fact, Form, UnsupportedArchitectureError
from seqedit.linalg import LayerSystem
from seqedit.methods import METHODS, LayerMethodState, float_option, unregister_method
from seqedit.models.arch import unregister_architecture
from seqedit.models.load import wrap_model
from seqedit.testing import tiny_model, tiny_tokenizer

LAYERS = (1, 2)


class ToyRidge(LayerMethodState):
    """``min Σ‖W k − v‖² + ρ‖W − W₀‖²``: least squares with a plain ridge, no covariance term."""

    @classmethod
    def create(cls, spec, sigma0: Tensor, lam: float, W0: Tensor) -> LayerMethodState:
        self = cls(spec)
        self._system = LayerSystem(torch.zeros_like(sigma0, dtype=torch.float64), 0.0, spec.rho)
        return self

    @property
    def system(self) -> Any:
        return self._system

    def _step(self, K: Tensor, R: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        raw = self._system.update(K, R)
        return raw, raw

    def _dump(self) -> dict[str, Any]:
        return {"system": self._system.state_dict()}

    def _load(self, state: dict[str, Any], device: Any) -> None:
        self._system = LayerSystem.from_state_dict(state["system"], device=device)


@pytest.fixture
def toy_method():
    seqedit.register_method(
        "toy_ridge",
        {
            "aligned": Form(ToyRidge, Capabilities(removal="system", exact=True, matches_one_time=True), {"rho": None}),
            "fresh": Form(ToyRidge, Capabilities(ote_same_as="aligned"), {"rho": None}),
        },
        options=[float_option("rho", 0.5, "the ridge", positive=True)],
    )
    yield "toy_ridge"
    unregister_method("toy_ridge")


def _facts(n: int) -> list[Fact]:
    return [Fact(prompt="{} is located in", subject=f"Place {i}", target=f"Town {i}", id=f"t{i}") for i in range(n)]


def _frozen_columns(lm, n: int, seed: int = 0) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    d_out, d_in = lm.adapter.dims(LAYERS[0])
    g = torch.Generator().manual_seed(seed)
    K = {l: 0.1 * torch.randn(d_in, n, generator=g, dtype=torch.float64) for l in LAYERS}
    V = {l: torch.randn(d_out, n, generator=g, dtype=torch.float64) for l in LAYERS}
    return K, V


def test_a_registered_method_is_parsed_listed_and_validated(toy_method: str) -> None:
    assert METHODS[toy_method] == ("aligned", "fresh")
    spec = seqedit.parse_method("Toy-Ridge", rho=2.0)
    assert spec.label == "toy_ridge/aligned" and spec.rho == 2.0 and spec.capabilities.exact
    assert seqedit.parse_method(toy_method).rho == 0.5  # the option's default
    with pytest.raises(ValueError, match="rho must be > 0"):
        seqedit.parse_method(toy_method, rho=0.0)
    with pytest.raises(ValueError, match="toy_ridge/aligned has no ridge"):
        seqedit.parse_method(toy_method, ridge=1.0)
    with pytest.raises(ValueError, match="already registered"):
        seqedit.register_method(toy_method, {"aligned": Form(ToyRidge)})


def test_a_registered_method_edits_and_equals_its_closed_form(toy_method: str) -> None:
    lm = tiny_model("llama")
    editor = Editor(lm, method=toy_method, layers=LAYERS, stats_tokens=2000, rho=0.25)
    K, V = _frozen_columns(lm, 6)
    W0 = {l: lm.adapter.weight(l).double() for l in LAYERS}
    for lo in (0, 3):  # two sequential steps of 3 ≡ the one-time ridge solution of all 6
        editor.apply_kv({l: K[l][:, lo:lo + 3] for l in LAYERS}, {l: V[l][:, lo:lo + 3] for l in LAYERS})
    for l in LAYERS:
        A = 0.25 * torch.eye(K[l].shape[0], dtype=torch.float64) + K[l] @ K[l].T
        direct = W0[l] + torch.linalg.solve(A, K[l] @ (V[l] - W0[l] @ K[l]).T).T
        gap = torch.linalg.matrix_norm(editor.master[l] - direct) / torch.linalg.matrix_norm(direct - W0[l])
        assert gap < 1e-10
    report = editor.run(_facts(2), batch_size=1)  # and the real pipeline (values, keys) runs it
    assert [r.method for r in report] == ["toy_ridge/aligned"] * 2


def test_a_registered_method_gets_the_ledger_operations_its_capabilities_allow(toy_method: str, tmp_path: Path) -> None:
    lm = tiny_model("llama")
    K, V = _frozen_columns(lm, 3)
    with Editor(lm, method=toy_method, layers=LAYERS, stats_tokens=2000, ledger=tmp_path / "L") as editor:
        editor.apply_kv(K, V, facts=_facts(3))
        editor.forget(["t1"])  # removal="system": exact removal
        assert [f.id for f in editor.facts_in_force()] == ["t0", "t2"]
        assert editor.verify(tol=1e-8).ok
    with Editor(tiny_model("llama"), ledger=tmp_path / "L") as reopened:  # the manifest names the method
        assert reopened.spec.label == "toy_ridge/aligned"
        assert all(torch.equal(reopened.master[l], editor.master[l]) for l in LAYERS)


def test_the_evaluation_plan_reads_the_registry(toy_method: str) -> None:
    from seqedit.evaluate.config import EvalConfig, plan

    runs, skipped = plan(EvalConfig(methods=("toy_ridge",), alignments=("aligned", "fresh", "naive"), modes=("se", "ote")))
    same = {r["label"]: r["same_as"] for r in runs}
    assert same == {"toy_ridge/aligned/se": None, "toy_ridge/aligned/ote": None,
                    "toy_ridge/fresh/se": None, "toy_ridge/fresh/ote": "toy_ridge/aligned/ote"}
    assert skipped == [{"config": "toy_ridge/naive", "reason": "toy_ridge has no 'naive' form (it has aligned, fresh)"}]


# ------------------------------------------------------------------------------ a new architecture


def _toy_llama():
    """A tiny Llama under a model_type seqedit does not know."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class ToyLlamaConfig(LlamaConfig):
        model_type = "toy_llama"

    class ToyLlamaForCausalLM(LlamaForCausalLM):
        config_class = ToyLlamaConfig

    tok = tiny_tokenizer()
    config = ToyLlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.eos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return ToyLlamaForCausalLM(config).eval(), tok


def test_a_registered_architecture_is_editable() -> None:
    model, tok = _toy_llama()
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'toy_llama'"):
        wrap_model(model, tok, "toy")
    seqedit.register_architecture(ArchSpec("toy_llama", ("toy_llama",), "model.layers", "mlp.down_proj", "model.norm"))
    try:
        with pytest.raises(ValueError, match="already registered"):
            seqedit.register_architecture(ArchSpec("other", ("toy_llama",), "model.layers", "mlp.fc", "model.norm"))
        editor = Editor(model, tok, layers=LAYERS, stats_tokens=2000, v_steps=2)  # an HF model + tokenizer
        before = {l: editor.loaded.adapter.weight(l).clone() for l in LAYERS}
        report = editor.apply(_facts(2))
        assert report.final_residual < report.target_norm
        for l in LAYERS:
            assert not torch.equal(model.model.layers[l].mlp.down_proj.weight, before[l])
            assert torch.equal(model.model.layers[l].mlp.down_proj.weight, editor.master[l].float())
    finally:
        unregister_architecture("toy_llama")


def test_editor_accepts_an_hf_model_only_with_its_tokenizer() -> None:
    lm = tiny_model("llama")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        Editor(lm.model, layers=LAYERS)
    with pytest.raises(TypeError, match="pass the method as method="):
        Editor(lm.model, "memit", layers=LAYERS)
    editor = Editor(lm.model, lm.tokenizer, layers=LAYERS, stats_tokens=2000)
    assert editor.loaded.model is lm.model and editor.hparams.layers == LAYERS
