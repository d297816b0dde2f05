"""The benchmark scripts' renderers on the results committed under docs/results (no model, no editing)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_chat_table_reproduces_the_documented_chat_20_table(tmp_path: Path) -> None:
    chat_table = _script("chat_table")
    shutil.copytree(ROOT / "docs" / "results" / "chat-20", tmp_path / "counterfact")
    rows = chat_table.table(tmp_path).splitlines()
    documented = (ROOT / "docs" / "chat.md").read_text()
    # the same numbers as the hand-made table of docs/chat.md (which has no edits column)
    assert rows[2] == "| counterfact / pre-edit | 0 | 30.0 | 30.0 | 75.0 | 30.0 | 30.0 | 65.0 | 0.0 | 38.40 |"
    assert rows[5] == "| counterfact / `both` | 20 | 95.0 | 95.0 | 70.0 | 100.0 | 100.0 | 65.0 | 85.0 | 38.39 |"
    assert "| `both` | 95.0 | 95.0 | 70.0 | 100.0 | 100.0 | 65.0 | 85.0 | 0.0 | 38.39 |" in documented
    assert [r.split(" | ")[0] for r in rows[3:]] == ["| counterfact / `bare`", "| counterfact / `chat`",
                                                    "| counterfact / `both`"]


def test_the_documented_chat_500_table_is_the_rendering_of_its_results() -> None:
    """docs/chat.md's issue-16 table is chat_table's output for docs/results/chat-500, row for row (with
    ZsRE's bare specificity read from ``specificity_vs_pre_edit``)."""
    chat_table = _script("chat_table")
    rows = chat_table.table(ROOT / "docs" / "results" / "chat-500").splitlines()
    documented = (ROOT / "docs" / "chat.md").read_text().splitlines()
    assert len(rows) >= 6 and all(r in documented for r in rows)
    zsre_bare = next(r for r in rows if r.startswith("| zsre / `bare`"))
    assert zsre_bare.split(" | ")[4] != "–"


def test_chat_table_marks_a_checkpointed_run_in_progress(tmp_path: Path) -> None:
    import json

    chat_table = _script("chat_table")
    src = json.loads((ROOT / "docs" / "results" / "chat-20" / "bare" / "results.json").read_text())
    cfg = src["configs"]["memit/aligned/se"]
    cfg["status"] = "running"
    (tmp_path / "zsre" / "bare").mkdir(parents=True)
    (tmp_path / "zsre" / "bare" / "results.json").write_text(json.dumps(src))
    row = chat_table.table(tmp_path).splitlines()[-1]
    # only the drift of its last curve point is known while it runs
    assert row.startswith("| zsre / `bare` (running) | 20 | – |") and row.endswith(f"| {cfg['curve'][-1]['drift']['ppl']:.2f} |")


def test_long_sweep_renders_its_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    long_sweep = _script("long_sweep")
    out = shutil.copytree(ROOT / "docs" / "results" / "sweep-1000", tmp_path / "sweep")
    (out / "sweep.md").unlink()
    (out / "sweep.png").unlink()
    long_sweep.render(out, "cmd")
    text = (out / "sweep.md").read_text()
    assert "| L4-10-clamp0.4 | layers=[4, 5, 6, 7, 8, 9, 10], clamp_norm_factor=0.4 | 1000 | 94.7 | 80.3 | 65.8 |" in text
    assert "`L4-10-clamp0.4-lr0.5`" in text and "was stopped after step 1" in text
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_long_sweep_renders_the_method_contrast(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    long_sweep = _script("long_sweep")
    out = shutil.copytree(ROOT / "docs" / "results" / "sweep-2000", tmp_path / "sweep")
    for name in ("sweep.md", "sweep.png", "methods.png"):
        (out / name).unlink()
    long_sweep.render(out, "cmd")  # preservation.json in the folder is no configuration and is passed over
    text = (out / "sweep.md").read_text()
    assert "| s30-mp-memit-naive | stop_rule=most_probable, method=memit, alignment=naive | 2000 | 80.4 |" in text
    assert "![efficacy, perplexity and edited-matrix norm against edits, per method](methods.png)" in text
    assert (out / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [long_sweep.method_of(json.loads((out / f"{n}.json").read_text())) for n in long_sweep.CONTRAST] == [
        ("memit", "aligned"), ("alphaedit", "aligned"), ("memit", "naive")]


def test_chat_table_renders_a_formats_variants_after_it(tmp_path: Path) -> None:
    chat_table = _script("chat_table")
    for name in ("both-averaged", "bare", "both", "both-averaged-budget0.4", "chat"):
        shutil.copytree(ROOT / "docs" / "results" / "chat-20" / name.split("-")[0], tmp_path / "counterfact" / name)
    labels = [r.split(" | ")[0] for r in chat_table.table(tmp_path).splitlines()[3:]]
    assert labels == ["| counterfact / `bare`", "| counterfact / `chat`", "| counterfact / `both`",
                      "| counterfact / `both`, averaged", "| counterfact / `both`, averaged, budget0.4"]


def test_key_drift_plot_draws_the_committed_report(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    plot = _script("key_drift_plot")
    report = ROOT / "docs" / "results" / "cf-10000" / "memit-aligned" / "key-drift-after-step-55.json"
    monkeypatch.setattr(sys, "argv", ["key_drift_plot.py", str(report), str(tmp_path / "d.png")])
    plot.main()
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_staleness_on_a_tiny_ledger(tmp_path: Path, monkeypatch) -> None:
    """Facts edited into a tiny model: the edited model reaches part of each stored target, the targets
    themselves are injected (with Z, efficacy is that of a model holding exactly Z), and a ledger in
    another format is refused."""
    import json

    from ledger_helpers import make_editor

    from seqedit import Editor
    from seqedit.datasets import load_facts
    from seqedit.shared_data import counterfact_path
    from seqedit.testing import tiny_model

    st = _script("target_staleness")
    facts = load_facts(counterfact_path(), limit=6)
    ed = make_editor(tmp_path / "L")
    ed.run(facts, batch_size=2)
    ed.close()
    monkeypatch.setattr(Editor, "from_ledger", classmethod(lambda cls, path: cls(tiny_model("llama"), ledger=path)))
    assert st.main([str(tmp_path / "L"), "--groups", "3", "--json", str(tmp_path / "s.json")]) == 0
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["facts"] == 6 and [g["facts"] for g in out["groups"]] == [[1, 2], [3, 4], [5, 6]]
    for g in out["groups"]:
        assert 0 < g["reached_median"] <= 1
        assert 0 <= g["efficacy_with_z"] <= 1 and 0 <= g["efficacy_now"] <= 1
    # injecting Z where the model already holds it changes nothing: on a fresh editor whose z-layer
    # state is taken as the target, efficacy with Z equals efficacy now
    with Editor(tiny_model("llama"), layers=(1, 2), stats_tokens=2000) as plain:
        H = st.z_states(plain, facts)
        assert torch.equal(st.efficacy(plain, facts, H), st.efficacy(plain, facts, None))


def test_ledger_cohorts_scores_the_ledgers_model_in_editing_order(tmp_path: Path, monkeypatch) -> None:
    """Facts edited into a tiny model's ledger: the cohorts follow the editing order, and each cohort's
    means are those of the evaluation's own metrics on the reopened ledger's model, in bare and chat."""
    import json

    from ledger_helpers import make_editor

    from seqedit import Editor
    from seqedit.datasets import load_facts
    from seqedit.evaluate.chat import chat_metrics
    from seqedit.evaluate.counterfact import counterfact_metrics
    from seqedit.shared_data import counterfact_path
    from seqedit.testing import tiny_model

    lc = _script("ledger_cohorts")
    facts = load_facts(counterfact_path(), limit=6)
    ed = make_editor(tmp_path / "L", v_steps=10, lam=1e-3, v_lr=0.5)  # strong enough to flip a fact
    ed.run(facts, batch_size=2)
    ed.close()
    monkeypatch.setattr(Editor, "from_ledger", classmethod(lambda cls, path: cls(tiny_model("llama"), ledger=path)))
    assert lc.main([str(tmp_path / "L"), "--dataset", "counterfact", "--cohort", "4", "--chat",
                    "--json", str(tmp_path / "c.json")]) == 0
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["facts"] == 6 and out["steps"] == 3
    assert [c["facts"] for c in out["by_cohort"]] == [[1, 4], [5, 6]] == [c["facts"] for c in out["chat_by_cohort"]]
    with Editor.from_ledger(tmp_path / "L") as again:
        assert [f.id for f in again.facts_in_force()] == [f.id for f in facts]  # the editing order
        bare = counterfact_metrics(again.loaded, facts).records
        chat = chat_metrics(again.loaded, facts).records
    for c, lo, hi in zip(out["by_cohort"], (0, 4), (4, 6)):
        assert c["efficacy"] == pytest.approx(sum(r.efficacy for r in bare[lo:hi]) / (hi - lo))
        assert c["generalization"] == pytest.approx(sum(r.generalization for r in bare[lo:hi]) / (hi - lo))
    for c, lo, hi in zip(out["chat_by_cohort"], (0, 4), (4, 6)):
        assert c["efficacy"] == pytest.approx(sum(r.efficacy for r in chat[lo:hi]) / (hi - lo))
    assert out["efficacy"] == pytest.approx(sum(r.efficacy for r in bare) / 6)
    unedited = counterfact_metrics(tiny_model("llama"), facts).records
    assert [r.efficacy for r in unedited] != [r.efficacy for r in bare]  # so the edited model was scored
    with pytest.raises(SystemExit):
        lc.main([str(tmp_path / "L"), "--dataset", "counterfact", "--cohort", "0"])


def test_format_deltas_compares_the_formats_keys_and_deltas() -> None:
    """On a tiny model: every cosine is a cosine, each format's own δ keeps one format's budget and the
    shared δ of `both` may use √2 of it; a fact's bare and chat keys are read as `format_columns` does."""
    from seqedit.datasets import load_facts
    from seqedit.models.presets import EditHParams
    from seqedit.shared_data import counterfact_path
    from seqedit.testing import tiny_model

    fd = _script("format_deltas")
    facts = load_facts(counterfact_path(), limit=3)
    hp = EditHParams(layers=(1, 2), v_steps=4, clamp_norm_factor=0.05, n_context_templates=1)
    out = fd.measure(tiny_model("llama"), facts, hp)
    assert out["facts"] == 3 and set(out["keys_by_layer"]) == {"1", "2"}
    for q in [out["delta_cos_bare_chat"], out["delta_cos_both_bare"], *(v["same_fact_bare_chat"] for v in out["keys_by_layer"].values())]:
        assert -1 <= q["p10"] <= q["median"] <= q["p90"] <= 1 + 1e-9
    assert out["delta_over_h0"]["bare"]["p90"] <= 0.05 * (1 + 1e-5) and out["delta_over_h0"]["chat"]["p90"] <= 0.05 * (1 + 1e-5)
    assert 0.05 < out["delta_over_h0"]["both"]["p90"] <= 0.05 * 2**0.5 * (1 + 1e-5)


def test_long_sweep_runs_a_configuration_with_issue_30_measurements(tmp_path: Path) -> None:
    """One tiny sequential configuration: points every 2 edits with generation efficacy and ‖W − W₀‖,
    per-step δ bookkeeping, a method option, and a rerun that continues from the ledger."""
    from seqedit.datasets import load_facts
    from seqedit.evaluate.measure import References
    from seqedit.models.presets import EditHParams
    from seqedit.shared_data import counterfact_path
    from seqedit.testing import tiny_model

    long_sweep = _script("long_sweep")
    lm = tiny_model("llama")
    facts = load_facts(counterfact_path(), limit=4)
    refs = References.compute(lm, "counterfact", facts, 16, 1, 16)
    hp = EditHParams(layers=(1, 2), stats_tokens=2000, v_steps=3, lam=10.0, stop_rule="most_probable",
                     budget_anchor="clean")
    base_w: dict[int, torch.Tensor] = {}
    res = long_sweep.run_config(lm, hp, facts, refs, 1, base_w, tmp_path / "L", tmp_path / "p.json", every=2,
                                generation_n=2, method_options={"ridge": 5.0})
    assert [p["edits"] for p in res["points"]] == [2, 4]
    for p in res["points"]:
        assert 0.0 <= p["generation_efficacy"] <= 1.0 and sorted(p["delta_w_fro"]) == ["1", "2"]
    assert res["points"][0]["delta_w_fro"]["2"] < res["points"][1]["delta_w_fro"]["2"]
    step = res["steps"][-1]
    assert step["mean_delta_norm"] <= step["mean_budget_norm"] * (1 + 1e-5) and 0.0 <= step["clamped"] <= 1.0
    assert torch.equal(lm.adapter.weight(1), base_w[1])  # the base weights are restored afterwards
    again = long_sweep.run_config(lm, hp, facts, refs, 1, base_w, tmp_path / "L", tmp_path / "p.json", every=2,
                                  generation_n=2, method_options={"ridge": 5.0})
    assert len(again["steps"]) == 4 and [p["edits"] for p in again["points"]] == [2, 4]


def test_long_sweep_refreshes_under_a_journalled_lam_schedule_and_resumes(tmp_path: Path) -> None:
    """A configuration with λ_N (journalled by its ledger) and a refresh every 2 edits: the refresh runs
    before the measurement of its point and its steps do not count as edited facts; a rerun after the
    run was cut short continues from the ledger without refreshing twice."""
    from seqedit import Ledger
    from seqedit.datasets import load_facts
    from seqedit.evaluate.measure import References
    from seqedit.models.presets import EditHParams
    from seqedit.shared_data import counterfact_path
    from seqedit.testing import tiny_model

    long_sweep = _script("long_sweep")
    lm = tiny_model("llama")
    facts = load_facts(counterfact_path(), limit=4)
    refs = References.compute(lm, "counterfact", facts, 16, 1, 16)
    hp = EditHParams(layers=(1, 2), stats_tokens=2000, v_steps=2, lam=10.0, lam_growth=2)
    base_w: dict[int, torch.Tensor] = {}
    kw = dict(every=2, refresh={"every": 2, "max_facts": 1})
    first = long_sweep.run_config(lm, hp, facts[:2], refs, 1, base_w, tmp_path / "L", tmp_path / "p.json", **kw)
    assert [x["edits"] for x in first["refreshes"]] == [2] and [p["edits"] for p in first["points"]] == [2]
    r = first["refreshes"][0]
    assert r["in_force"] == 2 and len(r["refreshed"]) == min(1, r["faded"]) and len(r["steps"]) == len(r["refreshed"])
    # the same run continued to 4 facts (a rerun of a longer sweep): 2 facts done, no second refresh at 2
    res = long_sweep.run_config(lm, hp, facts, refs, 1, base_w, tmp_path / "L", tmp_path / "p.json", **kw)
    assert [x["edits"] for x in res["refreshes"]] == [2, 4] and [p["edits"] for p in res["points"]] == [2, 4]
    assert [x["edits"] for x in res["steps"]] == [1, 2, 3, 4]
    with Ledger(tmp_path / "L") as L:
        applies = [s for s in L.steps() if s.kind == "apply"]
        assert len(applies) == 4 + sum(len(x["refreshed"]) for x in res["refreshes"])
        assert applies[-1].info["lam"] == 20.0  # λ_N of 4 facts in force, journalled
    assert json.loads((tmp_path / "p.json").read_text())["refreshes"][0]["edits"] == 2


def test_ledger_scale_smoke_mode_measures_every_size(tmp_path: Path) -> None:
    """``benchmarks/ledger_scale.py --smoke``: two tiny ledgers built, every operation timed, the JSON
    report and the plot written, and the facts in force those the steps put there."""
    import json

    pytest.importorskip("matplotlib")
    ledger_scale = _script("ledger_scale")
    report = ledger_scale.main(["--smoke", "--out", str(tmp_path)])
    rows = report["rows"]
    assert [r["facts"] for r in rows] == [20, 60]
    # each size: n built, 2 one-fact steps and 2 hundred-fact steps on fresh slots
    assert [r["in_force_after"] for r in rows] == [20 + 2 + 200, 60 + 2 + 200]
    for r in rows:
        assert all(r[k] > 0 for k in ("step_1_s", "step_100_s", "reopen_s", "log_s", "verify_s", "disk_bytes"))
        assert len(r["step_1_all_s"]) == len(r["step_100_all_s"]) == 2
    assert json.loads((tmp_path / "ledger_scale.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "ledger_scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ledger_scale.table(rows).splitlines()[2].startswith("| 20 | ")


def test_preservation_cost_is_the_relative_output_change_on_the_covariance_keys(tmp_path: Path) -> None:
    """r = ‖ΔW X‖_F / ‖W₀ X‖_F for Σ₀ = X Xᵀ/n, and the ledger reader reports it per snapshot and layer."""
    from ledger_helpers import LAYERS, apply_facts, fact, make_editor

    pc = _script("preservation_cost")
    g = torch.Generator().manual_seed(0)
    X, W0, D = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 40), (4, 6), (4, 6)))
    r = pc.relative_cost(D, W0, X @ X.T / 40)
    assert abs(r - float((D @ X).norm() / (W0 @ X).norm())) < 1e-12
    ed = make_editor(tmp_path / "L", snapshot_every=1)
    apply_facts(ed, [fact(0), fact(1)])
    apply_facts(ed, [fact(2)])
    live = {l: ed.master[l].clone() for l in LAYERS}
    w0 = {l: ed.w0[l].clone() for l in LAYERS}
    sigma0 = {l: ed.sigma0[l].clone() for l in LAYERS}
    ed.close()
    out = pc.ledger_costs(tmp_path / "L", w0)
    last = out["snapshots"][-1]
    assert [s["step"] for s in out["snapshots"]] == [1, 2] and last["facts_in_force"] == 3
    for l in LAYERS:
        d = live[l] - w0[l]
        assert abs(last["layers"][str(l)]["delta_fro"] - float(d.norm())) < 1e-9
        assert abs(last["layers"][str(l)]["relative_cost"] - pc.relative_cost(d, w0[l], sigma0[l])) < 1e-12


def test_long_run_curves_read_both_result_formats_as_documented(tmp_path: Path) -> None:
    """stability.md's 10,000-edit numbers are what long_run_curves reads from the committed files: the
    seqedit eval run (s30-mp, section 8) and the long_sweep run (λ_N + refresh, section 9)."""
    curves = _script("long_run_curves")
    mp = curves.load(ROOT / "docs/results/cf-10000-mp/results.json", None)
    at = {p["edits"]: p for p in mp}
    assert round(100 * at[9900]["efficacy"], 1) == 73.7 and round(100 * at[9900]["ppl_increase"], 1) == 161.3
    assert round(at[1000]["top1"], 3) == 0.803
    assert round(100 * at[1000]["generation_efficacy"], 1) == 48.4 and round(at[9900]["delta_w_top"]) == 276
    folder = ROOT / "docs/results/cf-10000-lamN-refresh"
    base = json.loads((folder / "baseline.json").read_text())["ppl"]
    lam = {p["edits"]: p for p in curves.load(folder / "s30-mp-lamN-refresh.stop41.partial.json", base)}
    assert round(100 * lam[4000]["ppl_increase"], 1) == 20.6 and round(100 * lam[1000]["efficacy"], 1) == 97.4
    assert round(100 * lam[1000]["generation_efficacy"], 1) == 69.4 and round(lam[1000]["delta_w_top"]) == 145
    rerun = next(folder.glob("s30-mp-lamN-refresh.json"), None) or folder / "s30-mp-lamN-refresh.partial.json"
    again = {p["edits"]: p for p in curves.load(rerun, base)}  # stop 42's run of the same command (section 10)
    assert round(100 * again[7000]["ppl_increase"], 1) == 25.0 and round(100 * again[7000]["efficacy"], 1) == 71.3
    with pytest.raises(SystemExit, match="--baseline"):
        curves.load(folder / "s30-mp-lamN-refresh.stop41.partial.json", None)
    sys.argv = ["long_run_curves", "--run", f"mp={ROOT / 'docs/results/cf-10000-mp/results.json'}",
                "--run", f"lam={folder / 's30-mp-lamN-refresh.stop41.partial.json'}", "--baseline", str(folder / "baseline.json"),
                "--out", str(tmp_path / "c.png")]
    curves.main()
    assert (tmp_path / "c.png").stat().st_size > 10_000
