"""SE ≡ OTE on a tiny model's real keys and values: frozen targets (cache, shapes, the residual split),
every method's per-layer gap, and the ``verify-equivalence`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from seqedit import dump_facts
from seqedit.cli import app
from seqedit.evaluate.equivalence import equivalence_rows, verify_equivalence
from seqedit.datasets import load_facts
from seqedit.shared_data import counterfact_path, wikitext_path
from seqedit.locate.frozen import FrozenTargets, frozen_targets
from seqedit.locate.stats import layer_stats
from seqedit.locate.templates import context_templates
from seqedit.methods import METHODS, parse_method
from seqedit.models.presets import EditHParams
from seqedit.testing import tiny_model

HP = EditHParams(layers=(1, 2), lam=10.0, v_steps=3, stats_tokens=2000, n_context_templates=2)
ALL_SPECS = [parse_method(name, al) for name, aligns in METHODS.items() for al in aligns]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def facts():
    return load_facts(counterfact_path(), limit=12)


@pytest.fixture(scope="module")
def targets(lm, facts) -> FrozenTargets:
    templates = context_templates(lm, HP.n_context_templates, HP.context_template_len, HP.template_seed)
    return frozen_targets(lm, facts, templates, HP)


def test_frozen_targets_shapes_and_residual_split(lm, facts, targets) -> None:
    d_model = lm.model.config.hidden_size
    assert targets.n == len(facts) and targets.layers == HP.layers
    assert targets.fact_ids == [f.id for f in facts]
    for layer in HP.layers:
        W = lm.adapter.weight(layer)
        assert targets.keys[layer].shape == (W.shape[1], len(facts))
        assert targets.keys[layer].dtype == torch.float64
    assert targets.z.shape == targets.h0.shape == (d_model, len(facts))
    assert not torch.equal(targets.z, targets.h0)  # values were optimised
    W0 = {l: lm.adapter.weight(l) for l in HP.layers}
    V = targets.layer_values(W0)
    # the per-layer shares of the z-layer residual add up to the whole residual
    total = sum(V[l] - W0[l].double() @ targets.keys[l] for l in HP.layers)
    assert torch.allclose(total, targets.z - targets.h0, atol=1e-12)
    part = targets.value_result(3, 7)
    assert torch.equal(part.z, targets.z[:, 3:7]) and part.steps == targets.steps[3:7]


def test_frozen_targets_are_cached_by_facts(lm, facts, targets, monkeypatch) -> None:
    import seqedit.locate.frozen as frozen

    def boom(*a, **k):
        raise AssertionError("values recomputed despite the cache")

    templates = context_templates(lm, HP.n_context_templates, HP.context_template_len, HP.template_seed)
    monkeypatch.setattr(frozen, "compute_values", boom)
    again = frozen_targets(lm, facts, templates, HP)
    assert torch.equal(again.z, targets.z) and all(torch.equal(again.keys[l], targets.keys[l]) for l in HP.layers)
    with pytest.raises(AssertionError, match="recomputed"):
        frozen_targets(lm, facts[:5], templates, HP)  # other facts: a different cache entry
    with pytest.raises(AssertionError, match="recomputed"):
        frozen_targets(lm, facts, templates, HP.override(v_steps=2))


def test_frozen_targets_file_round_trip_and_bad_file(targets, tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    targets.save(path)
    back = FrozenTargets.load(path)
    assert back.fact_ids == targets.fact_ids and back.nll == targets.nll
    assert torch.equal(back.h0, targets.h0)
    from safetensors.torch import save_file

    save_file({"z": targets.z}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not a seqedit frozen-targets file"):
        FrozenTargets.load(tmp_path / "bad.safetensors")


def test_every_aligned_form_matches_one_time_on_real_keys(lm, targets) -> None:
    stats = layer_stats(lm, HP.layers, wikitext_path("valid"), HP.stats_tokens, HP.stats_seq_len)
    sigma0 = {l: stats[l].sigma0 for l in HP.layers}
    W0 = {l: lm.adapter.weight(l).double() for l in HP.layers}
    by_label = {}
    for spec in ALL_SPECS:
        rows = equivalence_rows(spec, targets, sigma0, HP.lam, W0, batch_size=4)
        assert [r.layer for r in rows] == list(HP.layers)
        assert all(r.steps == 3 and r.n_facts == 12 for r in rows)
        by_label[spec.label] = rows
    for label, rows in by_label.items():
        spec = parse_method(*label.split("/"))
        for r in rows:
            if spec.matches_one_time:
                assert r.passed is True and r.gap < 1e-10, r
                assert r.gap == (r.gap_raw if spec.post_processed else r.gap_deployed)
            else:
                assert r.passed is None
    # the collapse control is far from the one-time solution on the same (K, V)
    assert min(r.gap for r in by_label["memit/naive"]) > 1e-3
    assert min(r.gap for r in by_label["prune/uncorrected"]) > 1e-6


def test_verify_equivalence_end_to_end(lm, facts) -> None:
    rows = verify_equivalence(lm, [parse_method("rlsedit"), parse_method("memit", "naive")], facts, HP, 6)
    assert [(r.method, r.layer) for r in rows] == [
        ("rlsedit/aligned", 1), ("rlsedit/aligned", 2), ("memit/naive", 1), ("memit/naive", 2)
    ]
    assert all(r.passed for r in rows[:2]) and all(r.passed is None for r in rows[2:])
    with pytest.raises(ValueError, match="at least one method"):
        verify_equivalence(lm, [], facts, HP, 6)
    with pytest.raises(ValueError, match="batch_size"):
        verify_equivalence(lm, [parse_method("memit")], facts, HP, 0)


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory: pytest.TempPathFactory, lm, facts) -> tuple[Path, Path]:
    model_dir = tmp_path_factory.mktemp("tiny-eq")
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    return model_dir, dump_facts(facts[:8], tmp_path_factory.mktemp("eqfacts") / "f.jsonl")


def _cli(model_dir: Path, facts_file: Path, *extra: str):
    args = ["verify-equivalence", "--model", str(model_dir), "--facts", str(facts_file), "--n", "8",
            "--batch-size", "3", "--layers", "1,2", "--lam", "10", "--v-steps", "2", "--stats-tokens", "2000", *extra]
    return CliRunner().invoke(app, args)


def test_cli_json_table_and_exit_codes(cli_setup) -> None:
    model_dir, facts_file = cli_setup
    res = _cli(model_dir, facts_file, "--method", "memit,prune", "--alignment", "all", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    labels = [r["method"] for r in data["rows"]]
    assert labels == [m for m in ("memit/aligned", "memit/naive", "prune/aligned", "prune/uncorrected", "prune/naive")
                      for _ in (1, 2)]
    assert data["passed"] and data["n_facts"] == 8 and data["batch_size"] == 3
    assert all(r["gap"] < 1e-10 for r in data["rows"] if r["matches_one_time"])

    res = _cli(model_dir, facts_file, "--method", "alphaedit", "--alignment", "full")
    assert res.exit_code == 0, res.output
    assert "alphaedit/full" in res.stdout and "≡ OTE" in res.stdout

    # an impossible tolerance makes the aligned rows fail: exit code 1, named on stderr
    res = _cli(model_dir, facts_file, "--method", "memit", "--tol", "1e-300")
    assert res.exit_code == 1 and "above 1e-300" in res.stderr


def test_cli_rejects_unknown_method_and_alignment(cli_setup) -> None:
    model_dir, facts_file = cli_setup
    res = _cli(model_dir, facts_file, "--method", "romee")
    assert res.exit_code == 2 and "unknown method 'romee'" in res.stderr
    res = _cli(model_dir, facts_file, "--method", "rlsedit", "--alignment", "naive")
    assert res.exit_code == 2 and "no alignment 'naive'" in res.stderr
