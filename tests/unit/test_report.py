"""report.py renders from results.json alone: the table shows the recorded numbers in the paper's
layout (SE | OTE per cell), the plots are small PNGs, and missing pieces degrade gracefully."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from seqedit.evaluate.fluency import CONSISTENCY_UNAVAILABLE
from seqedit.report import load_results, markdown, render, render_plots, rendered

PNG = b"\x89PNG\r\n\x1a\n"


def edit(eff, gen, spe):
    return {"efficacy": eff, "generalization": gen, "specificity": spe, "n_records": 4, "seconds": 0.1,
            "records_per_second": 40.0}


def capability(f1, ppl, agree):
    tasks = {t: {"accuracy": f1, "f1": f1, "mcc": 0.0, "n": 2} for t in ("sst2", "rte")}
    return {"general": {"scoring": "likelihood", "tasks": tasks, "mean_f1": f1, "mean_accuracy": f1, "mean_mcc": 0.0},
            "drift": {"ppl": ppl, "agreement": agree, "n_tokens": 10}}


def entry(mode, eff, gen, spe, *, same_as=None, retention=True):
    final = {"edit": edit(eff, gen, spe), **capability(0.5, 12.5, 0.9), "fluency": {"fluency": 6.1}}
    steps = 2 if mode == "se" else 1
    return {
        "status": "done", "mode": mode, "same_as": same_as, "n_steps": steps, "final": final,
        "curve": ([{"step": 1, "edits": 2, **capability(0.6, 11.0, 0.95)}] if mode == "se" else [])
        + [{"step": steps, "edits": 4, "general": final["general"], "drift": final["drift"]}],
        "retention": [{"step": 1, "edits": 2, **edit(1.0, 0.5, 0.5)}, {"step": 2, "edits": 4, **final["edit"]}]
        if mode == "se" and retention else [],
        "seconds": {"edit": 3.25, "mean_step": 1.5, "evaluation": 2.0, "total": 5.0},
    }


@pytest.fixture
def results() -> dict:
    return {
        "format": "seqedit-eval/1",
        "settings": {"dataset": "counterfact", "n": 4, "batch_size": 2, "seed": 7, "general_n": 2,
                     "general_tasks": ["sst2", "rte"], "drift_windows": 1},
        "model": {"name": "tiny-llama"},
        "selection": {"method": "seeded shuffle"},
        "protocol": {"values": "original", "values_description": "frozen values", "evaluation": "final model",
                     "consistency": CONSISTENCY_UNAVAILABLE, "general_scoring": "likelihood",
                     "rte_labels": "GLUE labels; the official inversion is NOT copied"},
        "baseline": {"edit": edit(0.25, 0.125, 0.875), **capability(0.5, 10.0, 1.0),
                     "fluency": {"fluency": 6.2, "n_records": 1, "n_texts": 10, "n_without_prompts": 3}},
        "configs": {
            "memit/aligned/se": entry("se", 1.0, 0.75, 0.5),
            "memit/aligned/ote": entry("ote", 0.975, 0.7, 0.55),
            "memit/naive/se": entry("se", 0.5, 0.25, 0.625),
            "memit/naive/ote": {**entry("ote", 0.975, 0.7, 0.55), "same_as": "memit/aligned/ote"},
        },
        "skipped": [{"config": "rlsedit/naive", "reason": "rlsedit has no 'naive' form"}],
        "versions": {"seqedit": "0.1.0", "torch": "2.x"},
    }


def test_markdown_table_holds_the_numbers_in_the_papers_layout(results: dict) -> None:
    md = markdown(results)
    lines = md.splitlines()
    assert "| Method | Alignment | Eff. | Gen. | Spe. | Flu. (×100) |" in lines
    assert "| pre-edit | – | 25.0 | 12.5 | 87.5 | 620.0 |" in lines
    assert "| memit | aligned | 100.0 \\| 97.5 | 75.0 \\| 70.0 | 50.0 \\| 55.0 | 610.0 \\| 610.0 |" in lines
    assert "| memit | naive | 50.0 \\| 97.5† | 25.0 \\| 70.0† | 62.5 \\| 55.0† | 610.0 \\| 610.0† |" in lines
    assert "| Method | Alignment | sst2 | rte | mean F1 | PPL | top-1 agree |" in lines
    assert "| memit | aligned | 50.0 \\| 50.0 | 50.0 \\| 50.0 | 50.0 \\| 50.0 | 12.50 \\| 12.50 | 90.0 \\| 90.0 |" in lines
    assert "| pre-edit | – | 50.0 | 50.0 | 50.0 | 10.00 | 100.0 |" in lines
    assert "| memit/aligned/se | 2 | 3.2 | 1.5 | 2.0 | 40.0 |" in lines
    assert "memit/naive/ote" not in [l.split(" | ")[0].strip("| ") for l in lines if l.startswith("| memit/")]
    assert "values protocol **original**" in md and "seed 7" in md and "NOT copied" in md
    assert CONSISTENCY_UNAVAILABLE in md and "Skipped rlsedit/naive" in md
    assert "Fluency on 1 records' ROME generation prompts (10 sampled texts; 3 selected records have none" in md
    assert md.startswith("# seqedit evaluation: counterfact (knowedit layout), 4 edits, tiny-llama")
    assert "† memit/naive/ote is the identical one-step solve of memit/aligned/ote" in md
    assert "rekeyed" not in md.splitlines()[0]
    rekeyed = markdown({**results, "settings": {**results["settings"], "rekey_every": 5}})
    assert rekeyed.splitlines()[0].endswith(", rekeyed every 5 steps")


def test_the_fluency_line_explains_missing_prompts_only_when_some_are_missing(results: dict) -> None:
    r = copy.deepcopy(results)
    r["baseline"]["fluency"]["n_without_prompts"] = 0
    r["settings"].update(layout="rome", split="edit")
    md = markdown(r)
    assert "Fluency on 1 records' ROME generation prompts (10 sampled texts)." in md
    assert "have none" not in md
    assert md.startswith("# seqedit evaluation: counterfact (rome layout, edit split), 4 edits")
    zsre = {**r, "settings": {**r["settings"], "dataset": "zsre", "zsre_file": "mend-eval"}}
    assert markdown(zsre).startswith("# seqedit evaluation: zsre (mend-eval file), 4 edits")


def test_shared_final_scores_are_marked(results: dict) -> None:
    r = copy.deepcopy(results)
    r["configs"]["memit/aligned/ote"] = {**entry("ote", 1.0, 0.75, 0.5), "final_reused_from": "memit/aligned/se"}
    md = markdown(r)
    assert "| memit | aligned | 100.0 \\| 100.0‡ | 75.0 \\| 75.0‡ | 50.0 \\| 50.0‡ | 610.0 \\| 610.0‡ |" in md
    assert "‡ memit/aligned/ote ended on float32 weights bit-identical to memit/aligned/se's" in md
    assert "‡" not in markdown(results)


def test_an_unfinished_run_names_what_is_pending(results: dict) -> None:
    r = copy.deepcopy(results)
    r["planned"] = [*r["configs"], "prune/aligned/se"]
    md = markdown(r)
    assert "**Unfinished run**: 1 planned configurations not yet evaluated (prune/aligned/se)" in md
    assert "Unfinished" not in markdown({**r, "planned": list(r["configs"])})


def test_zsre_columns_and_missing_values(results: dict) -> None:
    z = copy.deepcopy(results)
    z["settings"]["dataset"] = "zsre"
    z["protocol"]["zsre_target"] = "answers[0] (ROME/MEMIT)"
    for e in [z["baseline"], *[c["final"] for c in z["configs"].values()]]:
        e["edit"] = {"efficacy": 0.5, "generalization": 0.25, "specificity_vs_pre_edit": 1.0,
                     "specificity_vs_gold": None}
    del z["configs"]["memit/aligned/ote"], z["configs"]["memit/naive/ote"]
    md = markdown(z)
    assert "| Method | Alignment | Eff. | Gen. | Spe. (vs pre-edit) | Spe. (vs gold) |" in md
    assert "| memit | aligned | 50.0 \\| · | 25.0 \\| · | 100.0 \\| · | – \\| · |" in md  # no OTE run, no gold value
    assert "answers[0] (ROME/MEMIT)" in md and "Flu." not in md


def test_plots_are_small_pngs_and_render_rereads_the_folder(results: dict, tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(results))
    paths = render(tmp_path)
    assert paths["markdown"] == str(tmp_path / "report.md")
    assert (tmp_path / "report.md").read_text() == markdown(results)
    assert rendered(tmp_path) == paths and rendered(tmp_path / "elsewhere") is None
    names = sorted(Path(p).name for p in paths["plots"])
    assert names == ["edit_metrics_vs_edits.png", "general_vs_edits.png", "se_vs_ote.png"]
    for p in paths["plots"]:
        blob = Path(p).read_bytes()
        assert blob.startswith(PNG) and 2_000 < len(blob) <= 100_000
    # without retention curves or general/drift settings: final points only, and no general plot
    bare = copy.deepcopy(results)
    bare["settings"].update(general_n=0, drift_windows=0)
    for c in bare["configs"].values():
        c["retention"] = []
    assert sorted(p.name for p in render_plots(bare, tmp_path / "bare")) == ["edit_metrics_vs_edits.png", "se_vs_ote.png"]


def test_nothing_done_and_missing_folder(results: dict, tmp_path: Path) -> None:
    empty = {**results, "configs": {"memit/aligned/se": {"status": "running"}}}
    assert render_plots(empty, tmp_path) == []
    md = markdown(empty)
    assert "| pre-edit | – | 25.0 |" in md and "| memit | aligned" not in md
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_results(tmp_path / "nowhere")


def test_drift_table_without_general_tasks_and_fluency_off(results: dict) -> None:
    """A run with --general-n 0 --fluency-n 0 still reports perplexity and agreement (found on a real run,
    whose drift numbers were missing from report.md), and says fluency was not measured."""
    data = copy.deepcopy(results)
    data["settings"] |= {"general_n": 0, "fluency_n": 0, "drift_window": 256}
    data["skipped"] = [{"config": "rlsedit/naive", "reason": "no naive form"}]
    text = markdown(data)
    assert "## WikiText-2 test drift (1 windows of 256 tokens)" in text
    assert "General capability" not in text and "sst2" not in text and "RTE:" not in text
    assert "| memit | aligned | 12.50 \\| 12.50 | 90.0 \\| 90.0 |" in text
    assert "| pre-edit | – | 10.00 | 100.0 |" in text
    assert "Fluency not measured" in text and "Flu. (×100)" not in text
    assert "\n\nSkipped rlsedit/naive: no naive form." in text  # a paragraph, not a table row


def test_along_the_run_has_one_row_per_recorded_point_and_the_final_model_last(results: dict) -> None:
    md = markdown(results)
    part = md.split("## Along the run")[1].split("## Timings")[0]
    aligned = part.split("**memit / aligned**")[1].split("**memit / naive**")[0]
    # pre-edit, then the retention and curve points merged by the number of edits, the final model last
    assert "| pre-edit | 25.0 | 12.5 | 87.5 | 10.00 | – | 100.0 | 50.0 |" in aligned
    assert "| 2 | 100.0 | 50.0 | 50.0 | 11.00 | +10.0 % | 95.0 | 60.0 |" in aligned
    assert "| 4 (final) | 100.0 | 75.0 | 50.0 | 12.50 | +25.0 % | 90.0 | 50.0 |" in aligned
    assert "**memit / naive**" in part and "/ aligned" not in part.split("**memit / naive**")[1]
    # OTE configurations have no points along a run; without any SE points there is no section
    for e in results["configs"].values():
        e["retention"], e["curve"] = [], []
    assert "## Along the run" not in markdown(results)


def test_a_run_still_going_shows_its_points_so_far(results: dict, tmp_path: Path) -> None:
    running = {"status": "running", "mode": "se", "edited": 2,
               "retention": [{"step": 1, "edits": 2, **edit(0.75, 0.5, 0.625),
                              "by_cohort": [{"facts": [1, 2], "efficacy": 0.75, "generalization": 0.5}]}],
               "curve": [{"step": 1, "edits": 2, **capability(0.4, 15.0, 0.8)}]}
    results["configs"] = {"memit/aligned/se": running}
    results["planned"] = ["memit/aligned/se"]
    md = markdown(results)
    assert "**memit / aligned** (unfinished: 2 of 4 facts edited so far)" in md
    assert "| 2 | 75.0 | 50.0 | 62.5 | 15.00 | +50.0 % | 80.0 | 40.0 |" in md and "(final)" not in md
    assert "Unfinished run" in md
    paths = render_plots(results, tmp_path)
    # the curves so far, but no SE-vs-OTE bars without a final model
    assert [p.name for p in paths] == ["edit_metrics_vs_edits.png", "general_vs_edits.png"]


def test_se_vs_ote_draws_only_the_modes_that_ran_and_no_bar_for_a_missing_metric(
    results: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import math

    from seqedit import report_plots as report_mod  # where the plots save their figures

    figs = {}
    real = report_mod.save_png

    def keep(fig, path, tight=True):
        figs[Path(path).name] = fig
        return real(fig, path, tight)

    monkeypatch.setattr(report_mod, "save_png", keep)

    def bars(ax) -> dict[str, list[float]]:
        return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}

    render_plots(results, tmp_path / "both")
    panel = figs["se_vs_ote.png"].axes[0]  # efficacy: rows memit/aligned, memit/naive
    assert bars(panel) == {"SE": [100.0, 50.0], "OTE": [97.5, 97.5]}
    # An SE-only run (a long checkpointed run): no OTE bars and no OTE legend entry.
    se_only = copy.deepcopy(results)
    se_only["configs"] = {k: v for k, v in se_only["configs"].items() if k.endswith("/se")}
    del se_only["configs"]["memit/naive/se"]["final"]["edit"]["efficacy"]  # a metric that was not measured
    render_plots(se_only, tmp_path / "se")
    panel = figs["se_vs_ote.png"].axes[0]
    heights = bars(panel)
    assert list(heights) == ["SE"] and [t.get_text() for t in panel.get_legend().get_texts()] == ["SE"]
    assert heights["SE"][0] == 100.0 and math.isnan(heights["SE"][1])


def test_generation_efficacy_and_weight_drift_along_the_run(results: dict, tmp_path: Path) -> None:
    se = results["configs"]["memit/aligned/se"]
    se["retention"][0]["generation"] = {"generation_efficacy": 0.5, "generation_generalization": 0.25, "n_records": 2}
    se["final"]["edit"]["generation"] = {"generation_efficacy": 0.25, "generation_generalization": 0.0, "n_records": 2}
    se["steps"] = [{"n_facts": 2, "drift_norms": {"1": 1.5, "2": 3.25}},
                   {"n_facts": 2, "drift_norms": {"1": 2.0, "2": 4.5}}]
    md = markdown(results)
    aligned = md.split("## Along the run")[1].split("**memit / naive**")[0]
    assert "| edits | Eff. | Gen. | Spe. | PPL | ΔPPL | top-1 agree | mean F1 | G-eff | ‖ΔW‖ |" in aligned
    assert "| pre-edit | 25.0 | 12.5 | 87.5 | 10.00 | – | 100.0 | 50.0 | – | 0.0 |" in aligned
    assert "| 2 | 100.0 | 50.0 | 50.0 | 11.00 | +10.0 % | 95.0 | 60.0 | 50.0 | 3.2 |" in aligned
    assert "| 4 (final) | 100.0 | 75.0 | 50.0 | 12.50 | +25.0 % | 90.0 | 50.0 | 25.0 | 4.5 |" in aligned
    naive = md.split("**memit / naive**")[1].split("## ")[0]
    assert "G-eff" not in naive and "‖ΔW‖" not in naive  # measured for one configuration only
    paths = [p.name for p in render_plots(results, tmp_path)]
    assert "weight_drift_vs_edits.png" in paths
    assert (tmp_path / "weight_drift_vs_edits.png").read_bytes()[:8] == PNG
