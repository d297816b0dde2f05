"""The Editor end to end on tiny offline models: what a step changes, its report, SE ≡ OTE through the
editor plumbing, modes, input errors, and the state a failing step leaves behind."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import seqedit
from seqedit import Editor, Fact, FactError, IllConditionedError, StepReport, UnsupportedArchitectureError
from seqedit.datasets import load_facts
from seqedit.shared_data import counterfact_path
from seqedit.locate.keys import ContextRows, read_keys
from seqedit.models.load import LoadedModel, wrap_model
from seqedit.testing import FAMILIES, tiny_model, tiny_tokenizer

LAYERS = (1, 2)
PHASES = {"templates", "values", "keys", "solve", "apply", "total"}


@functools.lru_cache(maxsize=None)
def _counterfact(n: int) -> tuple[Fact, ...]:
    return tuple(load_facts(counterfact_path(), limit=n))


def cf_facts(n: int) -> list[Fact]:
    """The first ``n`` real CounterFact facts (read once per session)."""
    return list(_counterfact(n))


def make_editor(lm: LoadedModel | None = None, **overrides) -> Editor:
    """A cheap editor on a tiny llama (or ``lm``): layers 1–2, Σ₀ on 2000 tokens, 4 value steps, λ=10.

    λ=10 (instead of the preset's 15000) lets a step explain most of the z-layer residual, so the
    checks below are not satisfied by a near-zero update.
    """
    kw = dict(layers=LAYERS, stats_tokens=2000, v_steps=4, lam=10.0) | overrides
    return Editor(lm if lm is not None else tiny_model("llama"), **kw)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """Names of the parameters of ``model`` that differ (bitwise) from ``before``."""
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def ffn_names(lm: LoadedModel, layers=LAYERS) -> set[str]:
    return {f"{lm.adapter.ffn_out_name(l)}.weight" for l in layers}


# ------------------------------------------------------------------------------------------ one step


@pytest.mark.parametrize("family", FAMILIES)
def test_step_edits_only_the_ffn_out_weights_and_reports(family: str) -> None:
    lm = tiny_model(family)
    before = snapshot(lm.model)
    facts = cf_facts(3)
    facts[1] = facts[1].with_id(None)  # ids are kept where given, assigned where missing
    editor = make_editor(lm)
    report = editor.apply(facts)

    assert changed(lm.model, before) == ffn_names(lm)
    for layer in LAYERS:
        assert editor.master[layer].dtype == torch.float64
        assert torch.equal(editor.master[layer].to(lm.dtype), lm.adapter.weight(layer))
        assert torch.equal(editor.delta(layer), editor.master[layer] - editor.w0[layer])
        assert report.update_norms[layer] == pytest.approx(float(editor.delta(layer).norm()), rel=1e-12)

    assert isinstance(report, StepReport) and report.id == 1 and editor.steps == [report]
    assert set(report.seconds) == PHASES
    assert all(s >= 0 for s in report.seconds.values())
    assert report.seconds["total"] >= sum(s for k, s in report.seconds.items() if k != "total") - 1e-9
    assert set(report.residual_norms) == set(LAYERS)
    assert report.target_norm == report.residual_norms[LAYERS[0]] > 0
    assert report.final_residual < 0.5 * report.target_norm  # the edit explains most of the residual
    assert len(report.value_steps) == len(report.value_loss) == 3

    ids = [f.id for f in report.facts]
    assert ids[0] == facts[0].id and ids[2] == facts[2].id
    assert ids[1] and len(set(ids)) == 3
    assert [f.with_id(None) for f in report.facts] == [f.with_id(None) for f in facts]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["fact_ids"] == ids and data["n_facts"] == 3


# --------------------------------------------------------------------------------- SE ≡ OTE (plumbing)


def test_sequential_kv_batches_equal_one_time_through_the_editor() -> None:
    """Frozen real keys and random targets: 4 steps of 5 facts give the one-step update of all 20."""
    se, ote = make_editor(), make_editor()
    lm = se.loaded
    ctx = ContextRows.build(lm.tokenizer, cf_facts(20), se.templates())
    K = read_keys(lm, ctx, LAYERS).keys
    gen = torch.Generator().manual_seed(0)
    V = {}
    for l in LAYERS:
        WK = lm.adapter.weight(l).double() @ K[l]
        V[l] = WK + WK.std() * torch.randn(WK.shape, generator=gen, dtype=torch.float64)
    assert all(K[l].shape == (64, 20) and V[l].shape == (32, 20) for l in LAYERS)

    for lo in range(0, 20, 5):
        se.apply_kv({l: K[l][:, lo : lo + 5] for l in LAYERS}, {l: V[l][:, lo : lo + 5] for l in LAYERS})
    ote.apply_kv(K, V)

    for l in LAYERS:
        d_se, d_ote = se.delta(l), ote.delta(l)
        assert float(d_ote.norm()) > 0
        assert float((d_se - d_ote).norm() / d_ote.norm()) < 1e-10
        assert se.systems[l].n_constraints == ote.systems[l].n_constraints == 20


def test_apply_kv_takes_absolute_targets_or_residuals_never_both() -> None:
    a, b = make_editor(), make_editor()
    d_out, d_in = a.loaded.adapter.dims(LAYERS[0])
    gen = torch.Generator().manual_seed(1)
    K = {l: 0.1 * torch.randn(d_in, 3, generator=gen, dtype=torch.float64) for l in LAYERS}
    R = {l: torch.randn(d_out, 3, generator=gen, dtype=torch.float64) for l in LAYERS}
    a.apply_kv(K, R=R)
    b.apply_kv(K, {l: b.loaded.adapter.weight(l).double() @ K[l] + R[l] for l in LAYERS})
    for l in LAYERS:
        assert torch.allclose(a.delta(l), b.delta(l), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="exactly one of V"):
        a.apply_kv(K, R, R=R)
    with pytest.raises(ValueError, match="exactly one of V"):
        a.apply_kv(K)


def test_run_twice_continues_and_callbacks_see_every_step() -> None:
    """Only forms with an end-of-run update are finalized by run(): memit keeps editing across runs."""
    seen = []

    class Hook:
        def on_step_end(self, editor, report, at):
            seen.append((report.id, at.step, at.steps, at.edited, at.total, len(editor.steps)))

    editor = make_editor(v_steps=2, callbacks=[Hook()])
    editor.run(cf_facts(3), batch_size=2)
    assert editor.finalize() == {}
    editor.run(cf_facts(4)[3:], batch_size=2)
    assert [r.id for r in editor.steps] == [1, 2, 3]
    assert seen == [(1, 1, 2, 2, 3, 1), (2, 2, 2, 3, 3, 2), (3, 1, 1, 1, 1, 3)]
    assert editor.systems[LAYERS[0]].n_constraints == 4


# ------------------------------------------------------------------------------------------- modes


def test_one_time_editor_refuses_a_second_step() -> None:
    editor = make_editor(mode="one_time", v_steps=2)
    editor.apply(cf_facts(2))
    before = snapshot(editor.loaded.model)
    with pytest.raises(RuntimeError, match="one_time.*already been applied.*sequential"):
        editor.apply(cf_facts(3)[2:])
    assert not changed(editor.loaded.model, before) and len(editor.steps) == 1


@pytest.mark.parametrize(("mode", "sizes"), [("sequential", [2, 2, 1]), ("one_time", [5])])
def test_run_batches_by_mode(mode: str, sizes: list[int]) -> None:
    facts = cf_facts(5)
    reports = make_editor(mode=mode, v_steps=2).run(facts, batch_size=2)
    assert [len(r.facts) for r in reports] == sizes
    assert [r.id for r in reports] == list(range(1, len(sizes) + 1))
    assert [f.id for r in reports for f in r.facts] == [f.id for f in facts]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "rome"}, ValueError, r"unknown method 'rome'; valid \(method: alignments\): memit.*alphaedit"),
        ({"mode": "batched"}, ValueError, r"unknown mode 'batched'.*sequential.*one_time"),
        ({"layers": (1, 4)}, ValueError, r"edited layer 4 does not exist: the model has 4 layers"),
        ({"layers": (-1, 2)}, ValueError, r"edited layer -1 does not exist"),
    ],
)
def test_bad_editor_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        make_editor(**kwargs)


@pytest.mark.parametrize(
    ("facts", "error", "message"),
    [
        ([], ValueError, "at least one fact"),
        ([("The mother tongue of {} is", "Danielle Darrieux", "English")], TypeError, "expected seqedit.Fact, got tuple"),
    ],
)
def test_bad_fact_lists_are_rejected_before_any_work(facts: list, error: type[Exception], message: str) -> None:
    editor = make_editor()
    before = snapshot(editor.loaded.model)
    with pytest.raises(error, match=message):
        editor.apply(facts)
    assert not changed(editor.loaded.model, before) and not editor.steps


def test_fact_whose_subject_is_not_in_the_prompt() -> None:
    with pytest.raises(FactError, match="subject 'Paris' does not occur in prompt"):
        Fact("The capital of France is", "Paris", "Lyon")
    assert issubclass(FactError, seqedit.SeqEditError)


def test_unsupported_architecture_names_the_supported_ones() -> None:
    from transformers import AutoModelForCausalLM, BloomConfig

    config = BloomConfig(vocab_size=1000, hidden_size=32, n_layer=2, n_head=4)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match=r"'bloom'.*supports .*gpt2.*llama.*qwen2"):
        wrap_model(model, tiny_tokenizer(), "tiny-bloom")


# ------------------------------------------------------------------------------- a failing step


def _fail_layer_solve(editor: Editor, layer: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next solve of ``layer`` raise IllConditionedError (the system itself stays intact)."""

    def boom(*_args, **_kwargs):
        raise IllConditionedError(f"injected failure in layer {layer}")

    # every solve path (update, update_factors) goes through update_factors
    monkeypatch.setattr(editor.systems[layer], "update_factors", boom)


def _state(editor: Editor) -> dict[str, object]:
    return {
        "master": {l: editor.master[l].clone() for l in LAYERS},
        "A": {l: editor.systems[l].A for l in LAYERS},
        "n": {l: editor.systems[l].n_constraints for l in LAYERS},
        "steps": len(editor.steps),
        "params": snapshot(editor.loaded.model),
    }


def _edited_then_failed(monkeypatch: pytest.MonkeyPatch) -> tuple[Editor, dict[str, object]]:
    """An editor after one good step and a second step whose layer-2 solve raised."""
    editor = make_editor(v_steps=2)
    facts = cf_facts(3)
    editor.apply(facts[:2])
    state = _state(editor)
    _fail_layer_solve(editor, LAYERS[-1], monkeypatch)
    with pytest.raises(IllConditionedError, match="injected failure in layer 2"):
        editor.apply(facts[2:])
    return editor, state


def test_failing_step_records_no_report_and_leaves_the_failing_layer_intact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What holds today: the error propagates, no StepReport is kept, the failing layer is untouched."""
    editor, before = _edited_then_failed(monkeypatch)
    last = LAYERS[-1]
    assert len(editor.steps) == before["steps"] == 1
    assert torch.equal(editor.master[last], before["master"][last])
    assert editor.systems[last].A is before["A"][last]
    assert editor.systems[last].n_constraints == before["n"][last]


def test_failing_step_leaves_the_editor_as_before_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    editor, before = _edited_then_failed(monkeypatch)
    first = LAYERS[0]
    assert editor.systems[first].n_constraints == before["n"][first]
    assert torch.equal(editor.systems[first].A, before["A"][first])
    assert torch.equal(editor.master[first], before["master"][first])
    assert not changed(editor.loaded.model, before["params"])


def test_failing_apply_kv_leaves_the_editor_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen-constraint insertion is all-or-nothing too."""
    editor = make_editor(v_steps=2)
    editor.apply(cf_facts(2))
    before = _state(editor)
    d_out, d_in = editor.loaded.adapter.dims(LAYERS[0])
    gen = torch.Generator().manual_seed(0)
    keys = {l: torch.randn(d_in, 3, generator=gen, dtype=torch.float64) for l in LAYERS}
    vals = {l: torch.randn(d_out, 3, generator=gen, dtype=torch.float64) for l in LAYERS}
    _fail_layer_solve(editor, LAYERS[-1], monkeypatch)
    with pytest.raises(IllConditionedError):
        editor.apply_kv(keys, vals)
    for l in LAYERS:
        assert editor.systems[l].n_constraints == before["n"][l]
        assert torch.equal(editor.master[l], before["master"][l])
    assert not changed(editor.loaded.model, before["params"])


# ------------------------------------------------------------------------------- every method

from seqedit.methods import METHODS, method_info  # noqa: E402

ALL_FORMS = [(name, al) for name, als in METHODS.items() for al in als]


@pytest.mark.parametrize(("method", "alignment"), ALL_FORMS)
def test_every_method_runs_a_sequential_edit(method: str, alignment: str) -> None:
    """Each method/alignment edits a tiny model in two steps, touching only the edited FFN outputs."""
    lm = tiny_model("llama")
    before = snapshot(lm.model)
    # tiny random models have no eigenvalue of Σ₀ below AlphaEdit's 2e-2: take a wide null space
    options = {"threshold": 1e3} if "threshold" in method_info(method).form(alignment).options else {}
    editor = make_editor(lm, v_steps=2, method=method, alignment=alignment, method_options=options)
    reports = editor.run(cf_facts(3), batch_size=2)
    assert [len(r.facts) for r in reports] == [2, 1]
    assert all(r.method == f"{method}/{alignment}" for r in reports)
    assert changed(lm.model, before) == ffn_names(lm)
    for layer in LAYERS:
        w = lm.adapter.weight(layer).double()
        torch.testing.assert_close(w, editor.master[layer].to(w.dtype))


def test_naive_prune_is_applied_once_at_the_end() -> None:
    """Naive PRUNE compresses the total update after the last step; a finalized editor refuses more steps."""
    editor = make_editor(v_steps=2, method="prune", alignment="naive")
    editor.run(cf_facts(3), batch_size=2)
    assert editor.finalize() == {}  # idempotent
    with pytest.raises(RuntimeError, match="finalized"):
        editor.apply(cf_facts(1))
