"""When a fact's value optimisation stops and how large its δ may grow (issue 30, "spend less per fact").

- ``stop_rule="most_probable"``: a fact stops at the first iteration at which its new target is the
  argmax continuation at every target token of every rewriting row (with a lead of more than
  ``stop_margin`` nats), checked here against full rows through the whole model, independent of the
  suffix cache and label-only logits of ``locate/values.py``;
- ``budget_anchor="clean"``: the δ budget is measured on the unedited model's ‖h0‖, so that an edited
  residual stream whose norm grew does not buy a later fact a larger δ.
"""

from __future__ import annotations

import pytest
import torch

from seqedit.editor import Editor
from seqedit.facts import Fact
from seqedit.locate.tokens import encode_prompt, target_ids
from seqedit.locate.trace import block_hidden, replace_block_hidden
from seqedit.locate.values import clean_h0_norms, compute_values, delta_budget
from seqedit.models.presets import EditHParams
from seqedit.testing import tiny_model

TEMPLATES = ["{}", "The weather was fine. {}", "Because of it. {}"]
# prompts that end on the subject, one-token targets: δ enters the residual stream right where the
# first target token is predicted, so even a random tiny model can be made to prefer the target
FACTS = [
    Fact("The favourite word of {}", "Danielle Darrieux", "music", "time"),
    Fact("In the notes of {}", "Michael Jordan", "city", "year"),
    Fact("The capital city of {}", "Italy", "first", "new"),
    Fact("The rival of {}", "Windows 95", "time", "two"),
]
# small steps and a roomy budget: the facts need a few to a few dozen steps to win
FAST = EditHParams(layers=(1, 2), v_lr=0.01, v_steps=25, clamp_norm_factor=8.0, v_weight_decay=0.0,
                   kl_factor=0.0, early_stop_loss=-1.0, v_batch_facts=8)


def _lead(lm, fact: Fact, delta: torch.Tensor, z_layer: int) -> float:
    """The smallest log-probability lead of the target token over its best rival, over every target
    token (teacher forced) of every rewriting row, with ``delta: [d]`` added at the subject's last
    token at the z-layer output."""
    tgt = list(target_ids(lm.tokenizer, fact.target))
    lead = float("inf")
    for template in TEMPLATES:
        enc = encode_prompt(lm.tokenizer, template, fact.prompt, fact.subject)
        ids = torch.tensor([list(enc.ids) + tgt])

        def inject(_m, _a, out, s=enc.subject_last):
            h = block_hidden(out).clone()
            h[0, s] = h[0, s] + delta.float()
            return replace_block_hidden(out, h)

        handle = lm.adapter.block(z_layer).register_forward_hook(inject)
        try:
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
        finally:
            handle.remove()
        for j, y in enumerate(tgt):
            row = logp[len(enc.ids) - 1 + j]
            rival = torch.cat([row[:y], row[y + 1:]]).max()
            lead = min(lead, float(row[y] - rival))
    return lead


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_most_probable_stops_at_the_first_iteration_the_target_wins(margin: float) -> None:
    lm = tiny_model("llama", hidden=64, intermediate=128)
    hp = FAST.override(stop_rule="most_probable", stop_margin=margin)
    got = compute_values(lm, FACTS, TEMPLATES, hp)
    stopped = [f for f, s in enumerate(got.steps) if s < hp.v_steps - 1]
    assert stopped, got.steps  # the rule must bite for the test to say anything
    for f, fact in enumerate(FACTS):
        lead = _lead(lm, fact, got.z[:, f] - got.h0[:, f], hp.z_layer)
        if f in stopped:
            assert lead > margin - 1e-4, (f, lead)
        if got.steps[f] > 0:  # one update fewer: not yet winning, or it would have stopped there
            fewer = compute_values(lm, [fact], TEMPLATES, hp.override(v_steps=got.steps[f]))
            assert fewer.steps[0] == got.steps[f] - 1
            assert _lead(lm, fact, fewer.z[:, 0] - fewer.h0[:, 0], hp.z_layer) <= margin + 1e-4


def test_a_margin_costs_steps_and_the_nll_rule_spends_the_whole_run() -> None:
    lm = tiny_model("llama", hidden=64, intermediate=128)
    plain = compute_values(lm, FACTS, TEMPLATES, FAST.override(stop_rule="most_probable"))
    wide = compute_values(lm, FACTS, TEMPLATES, FAST.override(stop_rule="most_probable", stop_margin=0.6))
    nll = compute_values(lm, FACTS, TEMPLATES, FAST)  # threshold −1: never reached
    assert all(a <= b for a, b in zip(plain.steps, wide.steps)), (plain.steps, wide.steps)
    assert sum(plain.steps) < sum(wide.steps) <= sum(nll.steps) == len(FACTS) * (FAST.v_steps - 1)
    # a fact that stops early has spent less of its budget than one optimised to the end
    assert sum(plain.delta_norms) < sum(nll.delta_norms)


def test_stop_options_are_validated() -> None:
    with pytest.raises(ValueError, match="stop_rule must be one of nll, most_probable"):
        FAST.override(stop_rule="first_win")
    with pytest.raises(ValueError, match="stop_margin must be >= 0"):
        FAST.override(stop_margin=-0.1)
    with pytest.raises(ValueError, match="budget_anchor must be one of current, clean"):
        FAST.override(budget_anchor="base")
    old = {k: v for k, v in FAST.to_dict().items() if k not in ("stop_rule", "stop_margin", "budget_anchor")}
    assert EditHParams.from_dict(old) == FAST  # a stored dict from before these options means the old rule


def _perturb_below_z(lm, hp: EditHParams, scale: float = 3.0) -> dict[int, torch.Tensor]:
    """Grow the first edited layer's weight (below the z-layer, so h0 changes); returns the base weights."""
    base = {l: lm.adapter.weight(l).detach().clone() for l in hp.layers}
    lm.adapter.set_weight(hp.layers[0], base[hp.layers[0]] * scale)
    return base


def test_clean_h0_norms_read_the_unedited_model_and_restore_the_edited_one() -> None:
    lm = tiny_model("gpt2", hidden=64, intermediate=128)
    hp = FAST
    before = compute_values(lm, FACTS, TEMPLATES, hp.override(v_steps=1)).h0.norm(dim=0)
    base = _perturb_below_z(lm, hp)
    edited = {l: lm.adapter.weight(l).detach().clone() for l in hp.layers}
    now = compute_values(lm, FACTS, TEMPLATES, hp.override(v_steps=1)).h0.norm(dim=0)
    assert not torch.allclose(now, before, rtol=1e-2)  # the perturbation really moved h0
    clean = clean_h0_norms(lm, FACTS, hp, base)
    torch.testing.assert_close(clean, before, rtol=1e-5, atol=1e-6)
    for l in hp.layers:
        assert torch.equal(lm.adapter.weight(l), edited[l])


def test_clean_h0_norms_restore_the_weights_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny_model("llama", hidden=64, intermediate=128)
    base = _perturb_below_z(lm, FAST)
    edited = {l: lm.adapter.weight(l).detach().clone() for l in FAST.layers}

    def boom(*_a, **_k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("seqedit.locate.values.read_keys", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        clean_h0_norms(lm, FACTS, FAST, base)
    for l in FAST.layers:
        assert torch.equal(lm.adapter.weight(l), edited[l])


def test_the_budget_is_held_to_the_reference_norms() -> None:
    # a budget small enough to bind for every fact: ‖δ_f‖ ends on c·ref_f, not on c·‖h0_f‖
    lm = tiny_model("llama", hidden=64, intermediate=128)
    hp = FAST.override(clamp_norm_factor=0.01, v_steps=4)
    ref = torch.tensor([10.0, 20.0, 5.0, 1.0], dtype=torch.float64)
    got = compute_values(lm, FACTS, TEMPLATES, hp, h0_norm_ref=ref)
    limit = delta_budget(hp, "bare") * ref
    torch.testing.assert_close((got.z - got.h0).norm(dim=0), limit, rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(got.budget_norms, dtype=torch.float64), limit, rtol=1e-6, atol=0)
    assert got.clamped_fraction() == 1.0
    own = compute_values(lm, FACTS, TEMPLATES, hp)
    torch.testing.assert_close(torch.tensor(own.budget_norms, dtype=torch.float64),
                               delta_budget(hp, "bare") * own.h0.norm(dim=0), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="one norm per fact"):
        compute_values(lm, FACTS, TEMPLATES, hp, h0_norm_ref=ref[:2])


def test_a_sequential_editor_measures_the_clean_budget_on_the_base_weights() -> None:
    """After a first step has grown the residual stream, the second step's budget is c·‖h0‖ of the
    unedited model with ``budget_anchor="clean"``, and of the edited one with ``"current"``."""
    first = [Fact("{} is a friend of", "Ada Lovelace", "music", "time"),
             Fact("The home of {} is", "Alan Turing", "city", "year")]
    second = FACTS[:2]
    expected = {}
    for anchor in ("clean", "current"):
        lm = tiny_model("llama", hidden=64, intermediate=128)
        hp = FAST.override(budget_anchor=anchor, v_steps=4, v_lr=0.5)
        clean = float(clean_h0_norms(lm, second, hp, {l: lm.adapter.weight(l) for l in hp.layers}).mean())
        editor = Editor(lm, hparams=hp.override(lam=1e-3), stats_tokens=2000)
        editor.apply(first)
        report = editor.apply(second)
        work = report.value_work
        assert work["mean_delta_norm"] <= work["mean_budget_norm"] * (1 + 1e-5)
        drift = report.drift_norms
        assert set(drift) == set(hp.layers) and all(d > 0 for d in drift.values())
        assert report.to_dict()["drift_norms"] == {str(k): v for k, v in drift.items()}
        expected[anchor] = (work["mean_budget_norm"], delta_budget(hp, "bare") * clean, work["mean_h0_norm"])
    budget, clean_budget, h0 = expected["clean"]
    assert budget == pytest.approx(clean_budget, rel=1e-5)
    budget, clean_budget, h0 = expected["current"]
    assert budget == pytest.approx(delta_budget(FAST, "bare") * h0, rel=1e-5)
    assert abs(budget - clean_budget) > 1e-3 * clean_budget  # the first step really moved ‖h0‖
