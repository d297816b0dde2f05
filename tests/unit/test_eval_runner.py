"""The evaluation runner on a tiny llama: what results.json records, that the numbers are those of a
direct Editor run, resuming after an interruption, settings clashes, every error path, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from seqedit.cli import app
from seqedit.editor import Editor
from seqedit.ledger import Ledger
from seqedit.progress import Phase
from seqedit.evaluate.counterfact import counterfact_metrics
from seqedit.evaluate.measure import cohort_means
from seqedit.evaluate.config import EvalConfig, EvalSettingsError, plan
from seqedit.evaluate.results import check_out_dir
from seqedit.evaluate.runner import run_eval
from seqedit.evaluate.selection import select_facts
from seqedit.locate.frozen import frozen_targets
from seqedit.locate.templates import context_templates
from seqedit.models.presets import preset_for
from seqedit.testing import tiny_model
from test_cli import model_dir  # noqa: F401  (fixture: a tiny llama saved as an HF folder)

OVERRIDES = dict(layers=(1, 2), stats_tokens=2000, v_steps=4, lam=10.0)
MEMIT4 = {"memit/aligned/se", "memit/aligned/ote", "memit/naive/se", "memit/naive/ote"}


def config(**kw) -> EvalConfig:
    """4 ROME-layout facts in steps of 2, everything on but tiny."""
    base = dict(model="tiny-llama", n=4, batch_size=2, methods=("memit",), alignments=("aligned", "naive"),
                modes=("se", "ote"), general_n=1, general_tasks=("sst2", "rte"), general_every=1, retention_every=1,
                drift_windows=1, drift_window=16, fluency_n=1, fluency_tokens=24, layout="rome", overrides=dict(OVERRIDES),
                eval_batch_rows=16, values="original")
    return EvalConfig(**(base | kw))


def light(**kw) -> EvalConfig:
    """Edit metrics only (no general, drift, fluency or curves): the cheapest full run."""
    return config(**(dict(general_n=0, drift_windows=0, fluency_n=0, retention_every=0, general_every=0) | kw))


def weights(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def same_weights(lm, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def without_seconds(d):
    """``d`` with every timing removed (timings differ between otherwise identical evaluations)."""
    if isinstance(d, dict):
        return {k: without_seconds(v) for k, v in d.items() if k not in ("seconds", "records_per_second")}
    return [without_seconds(v) for v in d] if isinstance(d, list) else d


def test_run_records_everything_and_matches_a_direct_editor_run(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    before = weights(lm)
    calls: list[tuple] = []
    cfg = config()
    data = run_eval(cfg, tmp_path, calls.append, loaded=lm)
    assert same_weights(lm, before)  # every configuration started from, and the run ends on, the base weights
    assert json.loads((tmp_path / "results.json").read_text()) == data

    assert set(data["configs"]) == MEMIT4 and data["planned"] == list(data["configs"])
    run = data["runs"][-1]
    assert run["ran"] == ["memit/aligned/se", "memit/aligned/ote", "memit/naive/se"]
    assert run["reused"] == ["memit/naive/ote"] and run["finished"] and run["wall_seconds"] > 0
    naive_ote, aligned_ote = data["configs"]["memit/naive/ote"], data["configs"]["memit/aligned/ote"]
    assert naive_ote["same_as"] == "memit/aligned/ote" and naive_ote["final"] == aligned_ote["final"]
    configs = [(e.phase.value, e.advance, e.total) for e in calls if e.phase is Phase.CONFIGS and not e.start]
    assert configs == [("configs", 1, 4)] * 4

    sel = select_facts("counterfact", 4, cfg.seed, layout="rome", split="edit")
    assert data["selection"]["fact_ids"] == [f.id for f in sel.facts] and data["selection"]["seed"] == 0
    assert data["settings"]["split"] == "edit" and "methods" not in data["settings"]
    assert data["protocol"]["values"] == "original" and "NOT copied" in data["protocol"]["rte_labels"]
    assert "attribute_snippets" in data["protocol"]["consistency"]
    assert data["versions"]["torch"] == torch.__version__ and data["hparams"]["layers"] == [1, 2]

    base = data["baseline"]
    assert set(base["general"]["tasks"]) == {"sst2", "rte"} and base["drift"]["agreement"] == 1.0
    assert base["fluency"]["n_records"] == 1 and base["fluency"]["consistency"] is None
    se = data["configs"]["memit/aligned/se"]
    assert se["n_steps"] == 2 and [s["n_facts"] for s in se["steps"]] == [2, 2]
    assert all(s["seconds"]["total"] > 0 for s in se["steps"]) and se["seconds"]["edit"] > 0
    assert [p["edits"] for p in se["curve"]] == [2, 4] and [p["edits"] for p in se["retention"]] == [2, 4]
    assert se["retention"][0]["n_records"] == 2
    assert without_seconds(se["retention"][-1]) == {"step": 2, "edits": 4, **without_seconds(se["final"]["edit"])}
    assert se["final"]["edit"]["records_per_second"] > 0
    assert [p["edits"] for p in aligned_ote["curve"]] == [4] and aligned_ote["n_steps"] == 1

    # The same edit done by hand: two Editor steps on the frozen values, then the CounterFact metrics.
    hp = preset_for(lm.name, lm.adapter.n_layers).override(**OVERRIDES)
    templates = context_templates(lm, hp.n_context_templates, hp.context_template_len, hp.template_seed)
    targets = frozen_targets(lm, sel.facts, templates, hp)
    editor = Editor(lm, method="memit", alignment="aligned", hparams=hp)
    for lo in (0, 2):
        editor.apply(sel.facts[lo : lo + 2], values=targets.value_result(lo, lo + 2))
    direct = counterfact_metrics(lm, sel.facts, 16)
    cohorts = cohort_means(direct.records, 2)  # retention every step of 2 facts: cohorts of 2
    assert without_seconds(se["final"]["edit"]) == {**without_seconds(direct.summary()), "by_cohort": cohorts}


class Interrupt(Exception):
    pass


def test_resume_after_interruption_skips_done_configs(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    before = weights(lm)
    cfg = light(retention_every=1)

    def stop_after_first(event):
        if event.phase is Phase.CONFIGS and event.advance:  # the first configuration is done
            raise Interrupt

    with pytest.raises(Interrupt):
        run_eval(cfg, tmp_path, stop_after_first, loaded=lm)
    assert same_weights(lm, before)  # restored even though the run died
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["configs"]) == ["memit/aligned/se"] and saved["runs"][0]["finished"] is None

    data = run_eval(cfg, tmp_path, loaded=lm)
    assert data["configs"]["memit/aligned/se"] == saved["configs"]["memit/aligned/se"]
    assert data["baseline"] == saved["baseline"]
    assert data["runs"][-1]["resumed"] == ["memit/aligned/se"] and len(data["runs"]) == 2
    assert data["runs"][-1]["ran"] == ["memit/aligned/ote", "memit/naive/se"]
    # the resumed configuration has the numbers a fresh run gives
    fresh = run_eval(cfg, tmp_path / "fresh", loaded=lm)
    assert without_seconds(fresh["configs"]["memit/aligned/se"]["final"]) == without_seconds(
        data["configs"]["memit/aligned/se"]["final"])
    again = run_eval(cfg, tmp_path, loaded=lm)
    assert again["runs"][-1]["ran"] == [] and set(again["runs"][-1]["resumed"]) == MEMIT4


def test_resume_refuses_a_folder_made_with_another_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings record only the overrides; if the model's preset changed between two runs (a new
    seqedit), resuming would mix results of two hyperparameter sets under one header."""
    import seqedit.models.presets as presets

    lm = tiny_model("llama")
    cfg = light(modes=("se",), alignments=("aligned",))
    run_eval(cfg, tmp_path, loaded=lm)
    real = presets.preset_for
    monkeypatch.setattr(presets, "preset_for", lambda *a, **k: real(*a, **k).override(kl_factor=0.5))
    before = (tmp_path / "results.json").read_bytes()
    with pytest.raises(EvalSettingsError, match=r"other hyperparameters \(kl_factor: 0.0625 there, 0.5 now\)"):
        run_eval(cfg, tmp_path, loaded=lm)
    assert (tmp_path / "results.json").read_bytes() == before
    # as the message says, the old value passed with --set continues the folder (it was refused as a
    # settings clash on the overrides' spelling before), and the folder records the new spelling
    old = dataclasses.replace(cfg, overrides={**cfg.overrides, "kl_factor": 0.0625})
    again = run_eval(old, tmp_path, loaded=lm)
    assert again["hparams"]["kl_factor"] == 0.0625 and again["settings"]["overrides"]["kl_factor"] == 0.0625
    assert again["runs"][-1]["ran"] == []
    # a field the folder's record leaves out at its implied value (continuation_kl = 0, added later) too
    with_new_field = dataclasses.replace(old, overrides={**old.overrides, "continuation_kl": 0.0})
    assert "continuation_kl" not in again["hparams"]
    assert run_eval(with_new_field, tmp_path, loaded=lm)["runs"][-1]["ran"] == []
    # a value that is not the folder's is still refused, before the model loads
    other = dataclasses.replace(cfg, overrides={**cfg.overrides, "kl_factor": 0.25})
    with pytest.raises(EvalSettingsError, match=r"other settings \(overrides: .*'kl_factor': 0.25"):
        check_out_dir(other, tmp_path)


@pytest.mark.parametrize("kill_at", ["commit", "results"])
def test_checkpointed_run_continues_from_the_ledger(tmp_path: Path, kill_at: str) -> None:
    """Killed after step 1 of 3 (just after the ledger commit, or after results.json too), the run
    continues from the ledger and ends with the numbers of an uninterrupted checkpointed run."""
    lm = tiny_model("llama")
    before = weights(lm)
    cfg = light(n=6, values="current", alignments=("aligned",), modes=("se",), checkpoint=True, general_every=1,
                general_n=1, drift_windows=1)
    seen = {"steps": 0}

    def kill(event):
        if event.phase is Phase.STEPS and event.advance:
            seen["steps"] += 1
        # STEPS advances after step 1's ledger commit, before its curve point and results.json are
        # written; step 2's VALUES start comes after both
        if kill_at == "commit" and seen["steps"] == 1 and event.phase is Phase.STEPS:
            raise Interrupt
        if kill_at == "results" and seen["steps"] == 1 and event.phase is Phase.VALUES and event.start:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_eval(cfg, tmp_path, kill, loaded=lm)
    assert same_weights(lm, before)
    saved = json.loads((tmp_path / "results.json").read_text())
    label = "memit/aligned/se"
    if kill_at == "results":
        assert saved["configs"][label]["status"] == "running" and len(saved["configs"][label]["steps"]) == 1
        assert [p["step"] for p in saved["configs"][label]["curve"]] == [1]
    else:
        assert label not in saved["configs"]
    data = run_eval(cfg, tmp_path, loaded=lm)
    entry = data["configs"][label]
    assert data["runs"][-1]["continued"] == [label] and entry["continued_after_step"] == 1
    assert entry["status"] == "done" and entry["n_steps"] == 3 and entry["steps"][0]["n_facts"] == 2
    assert [p["step"] for p in entry["curve"]] == [1, 2, 3]
    assert same_weights(lm, before)

    fresh = run_eval(cfg, tmp_path / "fresh", loaded=lm)["configs"][label]
    assert fresh.get("continued_after_step") == 0
    assert without_seconds(fresh["final"]) == without_seconds(entry["final"])
    assert without_seconds(fresh["curve"]) == without_seconds(entry["curve"])


def test_a_run_killed_before_a_due_rekey_rekeys_when_it_continues(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    cfg = light(n=6, values="current", alignments=("aligned",), modes=("se",), checkpoint=True, general_every=0,
                general_n=1, drift_windows=1, rekey_every=2)

    def kill(event):  # step 2 is committed, its rekey not
        if event.phase is Phase.LAYERS and event.start and event.message == "rekey":
            raise Interrupt

    with pytest.raises(Interrupt):
        run_eval(cfg, tmp_path, kill, loaded=lm)
    ledger = tmp_path / "ledgers" / "memit-aligned-se"
    with Ledger(ledger) as L:
        assert [s.kind for s in L.steps()] == ["apply", "apply"]
    entry = run_eval(cfg, tmp_path, loaded=lm)["configs"]["memit/aligned/se"]
    with Ledger(ledger) as L:
        assert [s.kind for s in L.steps()] == ["apply", "apply", "rekey", "apply"]
    fresh = run_eval(cfg, tmp_path / "fresh", loaded=lm)["configs"]["memit/aligned/se"]
    assert entry["n_steps"] == fresh["n_steps"] == 3
    assert without_seconds(fresh["final"]) == without_seconds(entry["final"])


def test_checkpointed_selection_keeps_one_fact_per_slot() -> None:
    plain = select_facts("counterfact", 2000, 0, split="train")
    slots = [(f.subject, f.prompt) for f in plain.facts]
    assert len(set(slots)) < len(slots)  # the shuffle does draw multi-valued slots (twin cities)
    unique = select_facts("counterfact", 2000, 0, split="train", unique_slots=True)
    assert len({(f.subject, f.prompt) for f in unique.facts}) == 2000
    kept = iter(unique.facts)  # the same order, the repeated slots passed over
    assert [f.id for f in plain.facts if f.id not in unique.skipped_same_slot][:1900] == [next(kept).id for _ in range(1900)]
    assert unique.to_dict()["skipped_same_slot"] == list(unique.skipped_same_slot)


def test_other_settings_in_the_same_folder_are_refused(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    cfg = light(modes=("ote",), alignments=("aligned",))
    run_eval(cfg, tmp_path, loaded=lm)
    for change, named in [(dict(n=5), "n: 4 there, 5 now"), (dict(values="current"), "values"),
                          (dict(overrides=dict(OVERRIDES, lam=11.0)), "overrides"), (dict(seed=1), "seed")]:
        with pytest.raises(EvalSettingsError, match=named):
            run_eval(dataclasses.replace(cfg, **change), tmp_path, loaded=lm)
        with pytest.raises(EvalSettingsError, match="another --out folder"):
            check_out_dir(dataclasses.replace(cfg, **change), tmp_path)
    with pytest.raises(EvalSettingsError, match="another model or base weights"):
        run_eval(cfg, tmp_path, loaded=tiny_model("llama", seed=1))
    # more configurations in the same folder are fine: done ones are kept
    more = run_eval(dataclasses.replace(cfg, methods=("memit", "rlsedit")), tmp_path, loaded=lm)
    assert more["runs"][-1]["resumed"] == ["memit/aligned/ote"] and more["runs"][-1]["ran"] == ["rlsedit/aligned/ote"]

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    with pytest.raises(EvalSettingsError, match="not valid JSON"):
        check_out_dir(cfg, tmp_path / "bad")
    (tmp_path / "bad" / "results.json").write_text('{"format": "other"}')
    with pytest.raises(EvalSettingsError, match="not a seqedit-eval/1"):
        check_out_dir(cfg, tmp_path / "bad")


@pytest.mark.parametrize("change, match", [
    (dict(dataset="wiki"), "unknown dataset"),
    (dict(n=0), "n and batch_size"),
    (dict(batch_size=0), "n and batch_size"),
    (dict(values="later"), "values protocol"),
    (dict(modes=("se", "batch")), "modes"),
    (dict(modes=()), "modes"),
    (dict(methods=("rome",)), "unknown method"),
    (dict(methods=()), "at least one method"),
    (dict(alignments=("uncorrected",)), "exists for none"),
    (dict(general_scoring="vibes"), "general_scoring"),
    (dict(general_tasks=("squad",)), "general task"),
    (dict(general_every=-1), "general_every"),
    (dict(retention_every=-2), "retention_every"),
    (dict(fluency_n=-1), "fluency_n"),
    (dict(drift_window=1), "drift_window"),
    (dict(fluency_tokens=1), "fluency_tokens"),
    (dict(layout="mend"), "layout"),
    (dict(zsre_target="gold"), "zsre_target"),
    (dict(rekey_every=2), "rekey_every .* needs checkpoint"),
    (dict(rekey_every=-1, checkpoint=True), "rekey_every must be >= 0"),
])
def test_invalid_settings_are_named(tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(EvalSettingsError, match=match):
        check_out_dir(config(**change), tmp_path)


def test_bad_override_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(EvalSettingsError, match="bad preset or hyperparameter override: .*layerz"):
        run_eval(light(overrides={"layerz": (1,)}), tmp_path, loaded=tiny_model("llama"))


def test_plan_reuses_identical_ote_runs_and_names_skips() -> None:
    runs, skipped = plan(config(methods=("memit", "prune", "rlsedit")))
    labels = [r["label"] for r in runs]
    assert labels == ["memit/aligned/se", "memit/aligned/ote", "memit/naive/se", "memit/naive/ote",
                      "prune/aligned/se", "prune/aligned/ote", "prune/naive/se", "prune/naive/ote",
                      "rlsedit/aligned/se", "rlsedit/aligned/ote"]
    same = {r["label"]: r["same_as"] for r in runs if r["same_as"]}
    assert same == {"memit/naive/ote": "memit/aligned/ote"}  # prune naive (ridge 0, PRUNE at the end) differs
    assert skipped == [{"config": "rlsedit/naive", "reason": "rlsedit has no 'naive' form (it has aligned)"}]
    runs, _ = plan(config(alignments=("naive",), modes=("ote",)))
    assert [(r["label"], r["same_as"]) for r in runs] == [("memit/naive/ote", None)]


def test_zsre_with_current_values(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    cfg = light(dataset="zsre", values="current", modes=("se",), alignments=("aligned",), retention_every=1)
    data = run_eval(cfg, tmp_path, loaded=lm)
    assert data["settings"]["split"] is None and data["protocol"]["values"] == "current"
    assert data["baseline"]["edit"]["specificity_vs_pre_edit"] == 1.0
    assert "answers[0]" in data["protocol"]["zsre_target"] and (tmp_path / "reference_zsre.json").is_file()
    entry = data["configs"]["memit/aligned/se"]
    assert entry["values"].startswith("current") and [p["edits"] for p in entry["retention"]] == [2, 4]
    assert entry["steps"][0]["value_work"]  # values were optimised by the step itself
    assert set(entry["final"]["edit"]) >= {"efficacy", "generalization", "specificity_vs_gold", "specificity_vs_pre_edit"}


def test_a_folder_adopts_the_baseline_of_another_measured_alike(tmp_path: Path, monkeypatch) -> None:
    from seqedit.evaluate import measure

    lm = tiny_model("llama")
    zsre = dict(dataset="zsre", general_n=1, general_tasks=("sst2",), drift_windows=1, modes=("se",),
                alignments=("aligned",))
    first = run_eval(light(**zsre), tmp_path / "a", loaded=lm)
    # another editing setup (batch size, values protocol, λ): the same unedited model, facts and metrics
    other = light(**zsre, batch_size=4, values="current", overrides=dict(OVERRIDES, lam=20.0))
    monkeypatch.setattr(measure.References, "compute", lambda *a, **k: pytest.fail("the baseline was measured again"))
    data = run_eval(other, tmp_path / "b", loaded=lm, baseline_from=tmp_path / "a")
    assert data["baseline"].pop("adopted_from") == str(tmp_path / "a")
    assert data["baseline"] == first["baseline"]
    for name in ("reference_zsre.json", "reference_drift.npz"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    assert data["configs"]["memit/aligned/se"]["final"]["edit"]["specificity_vs_pre_edit"] is not None
    # what would measure the baseline differently is refused, by name
    for change, match in [(dict(drift_windows=2), "drift_windows"), (dict(n=2), "n: 4 there, 2 now"),
                          (dict(chat_eval=True), "chat_metrics"), (dict(seed=1), "seed")]:
        with pytest.raises(EvalSettingsError, match=match):
            run_eval(light(**(zsre | change)), tmp_path / f"c{len(match)}", loaded=lm, baseline_from=tmp_path / "a")
    with pytest.raises(EvalSettingsError, match="cannot read"):
        run_eval(light(**zsre), tmp_path / "d", loaded=lm, baseline_from=tmp_path / "nowhere")


def test_retention_points_break_the_facts_into_cohorts_of_one_retention_stretch(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    data = run_eval(light(modes=("se",), alignments=("aligned",), retention_every=1), tmp_path / "r", loaded=lm)
    entry = data["configs"]["memit/aligned/se"]
    first, last = entry["retention"]
    # the cohorts are the facts of each stretch between retention points (2 steps of 2 facts here)
    assert [c["facts"] for c in first["by_cohort"]] == [[1, 2]]
    assert [c["facts"] for c in last["by_cohort"]] == [[1, 2], [3, 4]]
    for point in (first, last):
        for metric in ("efficacy", "generalization", "specificity"):
            sizes = [c["facts"][1] - c["facts"][0] + 1 for c in point["by_cohort"]]
            pooled = sum(n * c[metric] for n, c in zip(sizes, point["by_cohort"])) / sum(sizes)
            assert pooled == pytest.approx(point[metric])  # KnowEdit records define every metric
    assert [c["facts"] for c in data["baseline"]["edit"]["by_cohort"]] == [[1, 2], [3, 4]]
    from seqedit.report import render

    render(tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Retention by cohort" in md and "| 1–2 |" in md and "| 3–4 |" in md
    assert (tmp_path / "r" / "retention_by_cohort.png").read_bytes().startswith(b"\x89PNG")
    # without retention points there are no cohorts
    plain = run_eval(light(modes=("se",), alignments=("aligned",)), tmp_path / "p", loaded=lm)
    assert "by_cohort" not in plain["configs"]["memit/aligned/se"]["final"]["edit"]
    render(tmp_path / "p")
    assert not (tmp_path / "p" / "retention_by_cohort.png").exists()


def test_folders_measured_alike_compare_as_one_report(tmp_path: Path) -> None:
    from seqedit.evaluate.compare import merge_results
    from seqedit.report import markdown

    lm = tiny_model("llama")
    kw = dict(modes=("se",), retention_every=1, drift_windows=1)
    run_eval(light(**kw, alignments=("aligned",)), tmp_path / "aligned", loaded=lm)
    run_eval(light(**kw, alignments=("naive",)), tmp_path / "naive", loaded=lm, baseline_from=tmp_path / "aligned")
    # the same configuration with another λ: the folder names tell the two copies apart
    other = light(**kw, alignments=("aligned",), overrides=dict(OVERRIDES, lam=20.0))
    run_eval(other, tmp_path / "lam20", loaded=lm, baseline_from=tmp_path / "aligned")
    merged = merge_results([tmp_path / "aligned", tmp_path / "naive", tmp_path / "lam20"])
    assert list(merged["configs"]) == ["memit (aligned)/aligned/se", "memit/naive/se", "memit (lam20)/aligned/se"]
    mine = json.loads((tmp_path / "lam20" / "results.json").read_text())
    assert merged["configs"]["memit (lam20)/aligned/se"]["final"] == mine["configs"]["memit/aligned/se"]["final"]
    assert [s["hparams_vs_first"] for s in merged["sources"]] == [{}, {}, {"lam": [10.0, 20.0]}]
    md = markdown(merged)
    assert "**memit (lam20) / aligned**" in md and "lam = 20.0 (first: 10.0)" in md and "## Sources" in md
    # a folder that measured its baseline otherwise is refused, by name and by what differs
    run_eval(light(**kw, alignments=("aligned",), seed=1), tmp_path / "seed1", loaded=lm)
    with pytest.raises(EvalSettingsError, match="seed1 does not compare with .*aligned: .*seed"):
        merge_results([tmp_path / "aligned", tmp_path / "seed1"])
    with pytest.raises(EvalSettingsError, match="at least two"):
        merge_results([tmp_path / "aligned"])
    with pytest.raises(EvalSettingsError, match="cannot read"):
        merge_results([tmp_path / "aligned", tmp_path / "nowhere"])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "aligned").symlink_to(tmp_path / "lam20")
    with pytest.raises(EvalSettingsError, match="distinct folder names"):
        merge_results([tmp_path / "aligned", tmp_path / "x" / "aligned"])
    # the command writes the joint report and plots
    result = invoke("compare", tmp_path / "aligned", tmp_path / "naive", "--out", tmp_path / "joint")
    assert result.exit_code == 0, result.output
    joint = (tmp_path / "joint" / "report.md").read_text()
    assert "| memit | aligned |" in joint and "| memit | naive |" in joint and "Along the run" in joint
    assert (tmp_path / "joint" / "edit_metrics_vs_edits.png").read_bytes().startswith(b"\x89PNG")
    result = invoke("compare", tmp_path / "aligned", tmp_path / "seed1", "--out", tmp_path / "bad")
    assert result.exit_code != 0 and "seed" in result.output and not (tmp_path / "bad").exists()


def test_a_run_measured_in_parts_joins_into_one_curve(tmp_path: Path) -> None:
    from seqedit.evaluate.compare import merge_results
    from seqedit.report import markdown

    lm = tiny_model("llama")
    kw = dict(modes=("se",), alignments=("aligned",), drift_windows=1)
    run_eval(light(**kw, retention_every=1, general_every=1), tmp_path / "whole", loaded=lm)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    entry = whole["configs"]["memit/aligned/se"]
    n = whole["settings"]["n"]
    assert [p["edits"] for p in entry["retention"]] == [2, 4] and n == 4
    # A stopped run: its checkpoint holds the points so far and no final model.
    part = copy.deepcopy(whole)
    stopped = part["configs"]["memit/aligned/se"]
    del stopped["final"]
    stopped.update(status="running", retention=stopped["retention"][:1], curve=stopped["curve"][:1])
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "results.json").write_text(json.dumps(part))
    # ... run again to its end, scoring only the final model.
    run_eval(light(**kw), tmp_path / "end", loaded=lm, baseline_from=tmp_path / "whole")
    end = json.loads((tmp_path / "end" / "results.json").read_text())["configs"]["memit/aligned/se"]

    merged = merge_results([tmp_path / "part", tmp_path / "end"], join=True)
    joined = merged["configs"]["memit/aligned/se"]
    assert list(merged["configs"]) == ["memit/aligned/se"] and joined["status"] == "done"
    assert joined["final"] == end["final"]
    assert joined["retention"][0] == entry["retention"][0]  # the stopped run's point ...
    assert joined["retention"][1] == {"edits": n, **end["final"]["edit"]}  # ... then the final model's
    assert [p["edits"] for p in joined["curve"]] == [2, 4] and joined["curve"][1] == end["curve"][-1]
    assert joined["joined_from"] == [str(tmp_path / "part"), str(tmp_path / "end")]
    assert "one run measured in parts" in markdown(merged)
    result = invoke("compare", tmp_path / "part", tmp_path / "end", "--join", "--out", tmp_path / "joint")
    assert result.exit_code == 0, result.output
    assert "one run measured in parts" in (tmp_path / "joint" / "report.md").read_text()
    # Without --join the copies stay apart, one curve per folder.
    assert list(merge_results([tmp_path / "part", tmp_path / "end"])["configs"]) == [
        "memit (part)/aligned/se", "memit (end)/aligned/se"]
    # Rival measurements are refused: two finals, two points at one edit count, other hyperparameters.
    with pytest.raises(EvalSettingsError, match="both hold its final model"):
        merge_results([tmp_path / "whole", tmp_path / "end"], join=True)
    part2 = copy.deepcopy(part)
    part2["configs"]["memit/aligned/se"]["retention"] = entry["retention"]
    (tmp_path / "rival").mkdir()
    (tmp_path / "rival" / "results.json").write_text(json.dumps(part2))
    with pytest.raises(EvalSettingsError, match="both measured it at 4 edits"):
        merge_results([tmp_path / "rival", tmp_path / "end"], join=True)
    other = light(**kw, overrides=dict(OVERRIDES, lam=20.0))
    run_eval(other, tmp_path / "lam20", loaded=lm, baseline_from=tmp_path / "whole")
    with pytest.raises(EvalSettingsError, match="lam20 ran it otherwise"):
        merge_results([tmp_path / "part", tmp_path / "lam20"], join=True)


# ------------------------------------------------------------------------------------------------ CLI


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_eval_resume_report_and_errors(model_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    args = ["eval", "--out", out, "--model", model_dir, "--n", "4", "-b", "2", "--alignment", "aligned,naive",
            "--modes", "ote", "--layers", "1,2", "--lam", "10", "--v-steps", "4", "--stats-tokens", "2000",
            "--general-n", "1", "--drift-windows", "0", "--fluency-n", "0", "--layout", "rome"]
    first = invoke(*args, "--json")
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert doc["ran"] == ["memit/aligned/ote"] and doc["reused"] == ["memit/naive/ote"]
    assert doc["protocol"]["values"] == "current" and doc["configs"]["memit/naive/ote"]["same_as"] == "memit/aligned/ote"
    assert all(Path(p).is_file() for p in [doc["results"], doc["markdown"], *doc["plots"]]) and len(doc["plots"]) == 3
    again = json.loads(invoke(*args, "--json").stdout)
    assert again["ran"] == [] and again["resumed"] == ["memit/aligned/ote", "memit/naive/ote"]
    table = invoke(*args)  # the human-readable form
    assert table.exit_code == 0 and "memit/naive/ote" in table.stdout and "resumed" in table.stdout

    clash = invoke(*args, "--json", "--seed", "3")
    assert clash.exit_code == 2 and "error:" in clash.stderr and "seed" in clash.stderr and not clash.stdout
    bad = invoke("eval", "--out", tmp_path / "x", "--model", model_dir, "--values", "later")
    assert bad.exit_code == 2 and "valuesprotocol" in "".join(bad.stderr.split()) and not (tmp_path / "x" / "results.json").exists()

    rendered = invoke("report", out, "--json")
    assert rendered.exit_code == 0 and json.loads(rendered.stdout)["markdown"] == str(out / "report.md")
    missing = invoke("report", tmp_path / "nothing-here")
    assert missing.exit_code == 2 and "noresults.json" in "".join(missing.stderr.split())


def test_a_folder_grows_with_new_methods_and_keeps_earlier_skips(tmp_path: Path) -> None:
    """A second run adding a method to a finished folder runs only the new configurations and keeps the
    first run's requests and skips (found on a real run whose 'skipped' entry was overwritten)."""
    lm = tiny_model("llama")
    first = run_eval(light(methods=("memit", "rlsedit"), modes=("se",)), tmp_path, loaded=lm)
    assert first["skipped"] == [{"config": "rlsedit/naive", "reason": "rlsedit has no 'naive' form (it has aligned)"}]
    data = run_eval(light(methods=("alphaedit",), alignments=("aligned",), modes=("se",)), tmp_path, loaded=lm)
    assert data["runs"][-1]["ran"] == ["alphaedit/aligned/se"]
    assert list(data["configs"]) == ["memit/aligned/se", "memit/naive/se", "rlsedit/aligned/se", "alphaedit/aligned/se"]
    assert data["configs"]["rlsedit/aligned/se"] == first["configs"]["rlsedit/aligned/se"]
    assert data["skipped"] == first["skipped"]
    assert data["requested"]["methods"] == ["memit", "rlsedit", "alphaedit"]
    assert data["planned"] == list(data["configs"])


def test_bit_identical_final_weights_are_scored_once(tmp_path: Path) -> None:
    # n == batch_size: SE is one step from an empty history, the same arithmetic as OTE, so both end on
    # the same float32 weights; naive SE over two steps does not.
    lm = tiny_model("llama")
    data = run_eval(config(n=4, batch_size=4, general_every=0, retention_every=0), tmp_path, loaded=lm)
    se, ote = data["configs"]["memit/aligned/se"], data["configs"]["memit/aligned/ote"]
    assert se["final_weights_sha256"] == ote["final_weights_sha256"]
    assert se["final_reused_from"] is None and ote["final_reused_from"] == "memit/aligned/se"
    assert ote["final"] == se["final"] and ote["curve"][-1]["drift"] == se["final"]["drift"]
    # the reused numbers are those a fresh scoring of that model gives
    alone = run_eval(config(n=4, batch_size=4, general_every=0, retention_every=0, modes=("ote",),
                            alignments=("aligned",)), tmp_path / "alone", loaded=lm)
    assert alone["configs"]["memit/aligned/ote"]["final_reused_from"] is None
    assert without_seconds(alone["configs"]["memit/aligned/ote"]["final"]) == without_seconds(ote["final"])

    two_steps = run_eval(light(alignments=("naive",), modes=("se",)), tmp_path / "two", loaded=lm)
    naive = two_steps["configs"]["memit/naive/se"]
    assert naive["final_reused_from"] is None and naive["final_weights_sha256"] != se["final_weights_sha256"]
    # a resumed run keeps the scored configurations as sources: an added OTE reuses the stored SE
    grown = run_eval(config(n=4, batch_size=4, general_every=0, retention_every=0, alignments=("aligned",),
                            modes=("se",)), tmp_path / "grow", loaded=lm)
    assert "memit/aligned/ote" not in grown["configs"]
    grown = run_eval(config(n=4, batch_size=4, general_every=0, retention_every=0, alignments=("aligned",)),
                     tmp_path / "grow", loaded=lm)
    assert grown["configs"]["memit/aligned/ote"]["final_reused_from"] == "memit/aligned/se"


def test_generation_efficacy_and_weight_drift_at_every_measurement(tmp_path: Path) -> None:
    """``generation_n`` adds generation efficacy to the baseline, each retention point and the final
    measurement; every step records ‖W_ℓ − W₀_ℓ‖_F, which grows as the facts accumulate."""
    lm = tiny_model("llama")
    data = run_eval(light(modes=("se",), alignments=("aligned",), retention_every=1, generation_n=3,
                          batch_size=1), tmp_path / "r", loaded=lm)
    entry = data["configs"]["memit/aligned/se"]
    points = [data["baseline"]["edit"], *entry["retention"], entry["final"]["edit"]]
    for point in points:
        gen = point["generation"]
        assert 0.0 <= gen["generation_efficacy"] <= 1.0 and gen["n_records"] <= 3
    assert [p["generation"]["n_records"] for p in entry["retention"]] == [1, 2, 3, 3]
    drift = [s["drift_norms"] for s in entry["steps"]]
    assert [sorted(d) for d in drift] == [["1", "2"]] * 4
    first, last = (sum(d.values()) for d in (drift[0], drift[-1]))
    assert 0 < first < last
    with pytest.raises(EvalSettingsError, match="generation_n must be >= 0"):
        run_eval(light(generation_n=-1), tmp_path / "bad", loaded=lm)
    assert "generation_n" not in light().settings()  # folders made before the option stay resumable
