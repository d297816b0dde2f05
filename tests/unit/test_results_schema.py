"""The typed schema of results.json (seqedit.evaluate.schema): every committed results file reads and
writes back unchanged, a malformed one is refused by file and key path, unknown keys survive, and the
objects a writer builds have the keys the runner has always written."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqedit.evaluate.compare import merge_results
from seqedit.evaluate.config import EvalSettingsError
from seqedit.evaluate.results import FORMAT, ResultsStore, read_measured
from seqedit.evaluate.schema import (ConfigEntry, CurvePoint, EditMetrics, Record, ResultsFile, ResultsFileError,
                                     RetentionPoint, RunRecord, read_results)
from seqedit.report import markdown
from seqedit.report_data import load_results

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "docs" / "results").rglob("results.json"))
SMALL = ROOT / "docs" / "results" / "chat-20" / "bare"  # a small real folder: one SE configuration with curves


def _eval_files() -> list[Path]:
    return [p for p in RESULTS if json.loads(p.read_text("utf-8")).get("format") == FORMAT]


def _records(r: Record):
    """``r`` and every record below it."""
    yield r
    for f in dataclasses.fields(r):
        v = getattr(r, f.name)
        for x in v.values() if isinstance(v, dict) and f.name != "extra" else v if isinstance(v, tuple) else [v]:
            if isinstance(x, Record):
                yield from _records(x)


def test_every_committed_results_file_round_trips_exactly() -> None:
    files = _eval_files()
    # the only other results.json under docs/results is a benchmark's own file (ceiling.py), not an eval folder's
    others = [p for p in RESULTS if p not in files]
    assert len(files) >= 25 and all("format" not in json.loads(p.read_text("utf-8")) for p in others)
    for path in files:
        raw = json.loads(path.read_text("utf-8"))
        typed = read_results(path)
        assert typed.to_dict() == raw, path
        # the same bytes as the file, as atomic_write_json writes it: no int became a float, no null went
        # missing, no key moved (a resumed folder's diff shows only what the run added)
        assert json.dumps(typed.to_dict(), indent=2, ensure_ascii=False) + "\n" == path.read_text("utf-8"), path
        # the schema names every key these files hold: nothing fell through to ``extra``
        unknown = [(type(r).__name__, sorted(r.extra)) for r in _records(typed) if r.extra]
        assert unknown == [], (path, unknown[:3])


def test_older_files_read_with_their_missing_fields_as_none() -> None:
    # memit-500-current was written before final_weights_sha256, final_reused_from and the chat metrics existed
    old = read_results(ROOT / "docs" / "results" / "memit-500-current" / "results.json")
    entry = old.configs["memit/aligned/se"]
    assert entry.status == "done" and entry.final_weights_sha256 is None and entry.final_reused_from is None
    assert entry.final is not None and entry.final.edit is not None and entry.final.edit.chat is None
    assert "final_reused_from" not in old.to_dict()["configs"]["memit/aligned/se"]  # and stays absent
    new = read_results(SMALL / "results.json")
    se = new.configs["memit/aligned/se"]
    assert se.final_reused_from is None and "final_reused_from" in new.to_dict()["configs"]["memit/aligned/se"]
    assert se.final is not None and 0.0 <= se.final.edit.efficacy <= 1.0 and se.final.general is None
    assert se.final.edit.chat is not None and 0.0 <= se.final.edit.chat.answer_new <= 1.0
    assert new.settings.prompt_format is None and new.settings.chat_eval is True  # bare: left out at its default
    assert [p.edits for p in se.curve] == [new.settings.n] == [20]


def _broken(tmp_path: Path, change) -> Path:
    data = json.loads((SMALL / "results.json").read_text("utf-8"))
    change(data)
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(data), "utf-8")
    return folder


@pytest.mark.parametrize("change, message", [
    (lambda d: d["configs"]["memit/aligned/se"].pop("status"),
     r"configs\['memit/aligned/se'\]: missing required key 'status'"),
    (lambda d: d["configs"]["memit/aligned/se"]["final"]["edit"].update(efficacy="high"),
     r"configs\['memit/aligned/se'\]\.final\.edit\.efficacy: expected a number, got 'high' \(str\)"),
    (lambda d: d["configs"]["memit/aligned/se"]["curve"][0].update(edits=1.5),
     r"configs\['memit/aligned/se'\]\.curve\[0\]\.edits: expected an integer, got 1\.5 \(float\)"),
    (lambda d: d["configs"]["memit/aligned/se"].update(n_steps=True),  # a JSON bool is not a count
     r"configs\['memit/aligned/se'\]\.n_steps: expected an integer, got True"),
    (lambda d: d.update(runs={"started": "now"}), r"runs: expected a list"),
    (lambda d: d.update(planned=[None]), r"planned\[0\]: expected a string, got null"),
    (lambda d: d.pop("format"), r"the top level: missing required key 'format'"),
])
def test_a_malformed_file_is_refused_by_file_and_key_path(tmp_path: Path, change, message: str) -> None:
    folder = _broken(tmp_path, change)
    path = folder / "results.json"
    with pytest.raises(ResultsFileError, match=f"^{path}: {message}"):
        load_results(folder)
    assert issubclass(ResultsFileError, EvalSettingsError)  # the CLI's and the runner's handlers catch it


def test_every_reader_refuses_a_malformed_folder_by_name(tmp_path: Path) -> None:
    folder = _broken(tmp_path, lambda d: d["configs"]["memit/aligned/se"]["retention"].append({"step": 1}))
    shown = (rf"^{folder / 'results.json'}: configs\['memit/aligned/se'\]\.retention\[\d+\]: "
             "missing required key 'edits'")
    with pytest.raises(ResultsFileError, match=shown):  # resuming into it (seqedit eval)
        ResultsStore(folder, json.loads((SMALL / "results.json").read_text("utf-8"))["settings"])
    with pytest.raises(ResultsFileError, match=shown):  # adopting its baseline, comparing it
        read_measured(folder, "--baseline-from")
    with pytest.raises(ResultsFileError, match=shown):
        merge_results([SMALL, folder])
    with pytest.raises(ResultsFileError, match=r"^results\.json: settings\.n: expected an integer"):
        markdown({"format": FORMAT, "settings": {"n": "20"}})  # a dict handed to the report is checked too


def test_unknown_keys_are_written_back_and_leave_the_report_alone(tmp_path: Path) -> None:
    raw = json.loads((SMALL / "results.json").read_text("utf-8"))
    grown = copy.deepcopy(raw)
    grown["written_by_a_later_seqedit"] = {"nested": [1, 2.5, None]}
    grown["configs"]["memit/aligned/se"]["curve"][0]["general"] = {"mean_f1": 0.5, "new_score": 0.25}
    grown["configs"]["memit/aligned/se"]["final"]["edit"]["portability"] = 0.75
    typed = ResultsFile.from_dict(grown)
    assert typed.extra == {"written_by_a_later_seqedit": {"nested": [1, 2.5, None]}}
    assert typed.configs["memit/aligned/se"].final.edit.extra == {"portability": 0.75}
    assert typed.to_dict() == grown
    without = copy.deepcopy(grown)
    without["configs"]["memit/aligned/se"]["curve"][0]["general"] = {"mean_f1": 0.5}
    del without["written_by_a_later_seqedit"], without["configs"]["memit/aligned/se"]["final"]["edit"]["portability"]
    assert markdown(grown) == markdown(without)


def test_a_resumed_store_rewrites_its_file_unchanged(tmp_path: Path) -> None:
    folder = shutil.copytree(SMALL, tmp_path / "resumed")
    before = (folder / "results.json").read_bytes()
    store = ResultsStore(folder, json.loads(before)["settings"])
    store.write()
    assert (folder / "results.json").read_bytes() == before
    # what a run changes is what changes: one more run record, last
    store.update(runs=(*store.results.runs, RunRecord(started="2026-01-01T00:00:00+00:00")))
    store.write()
    after = json.loads((folder / "results.json").read_text("utf-8"))
    assert after["runs"][-1]["started"] == "2026-01-01T00:00:00+00:00"
    assert {**after, "runs": after["runs"][:-1]} == json.loads(before)
    assert list(after) == list(json.loads(before))


def test_built_objects_have_the_keys_the_runner_has_always_written() -> None:
    assert RunRecord(started="t").to_dict() == {"started": "t", "finished": None, "ran": [], "resumed": [],
                                                "reused": []}
    assert CurvePoint(step=1, edits=2).to_dict() == {"step": 1, "edits": 2, "general": None, "drift": None}
    entry = ConfigEntry(method="memit", status="done", final_reused_from="memit/aligned/se")
    assert entry.to_dict() == {"method": "memit", "same_as": None, "steps": [], "curve": [], "retention": [],
                               "final_reused_from": "memit/aligned/se", "status": "done"}
    running = ConfigEntry.running(method="memit", edited=2)  # no keys of a finished configuration
    assert running.to_dict() == {"method": "memit", "steps": [], "curve": [], "retention": [], "edited": 2,
                                 "status": "running"}
    # a value set on a record read without that key is written; one left unset keeps the file's spelling
    old = ResultsFile.from_dict({"format": FORMAT})
    assert old.to_dict() == {"format": FORMAT}
    assert dataclasses.replace(old, planned=("memit/aligned/se",)).to_dict() == {"format": FORMAT,
                                                                                  "planned": ["memit/aligned/se"]}
    entry = ConfigEntry.from_dict({"status": "running"})
    assert dataclasses.replace(entry, same_as="x").to_dict() == {"status": "running", "same_as": "x"}
    # the final model's retention point of a joined comparison: the final edit metrics at n edits, no step
    edit = EditMetrics.from_dict({"efficacy": 1.0, "specificity": None, "future": 1})
    assert RetentionPoint.of(edit, edits=4).to_dict() == {"edits": 4, "efficacy": 1.0, "specificity": None,
                                                          "future": 1}
    assert list(RetentionPoint.of(edit, edits=4, step=2).to_dict()) == ["step", "edits", "efficacy", "specificity",
                                                                        "future"]
    with pytest.raises(KeyError, match="EditMetrics has no field 'efficacyy'"):
        edit.metric("efficacyy")


# ------------------------------------------------------------------------------------------ generated

_fraction = st.one_of(st.none(), st.floats(0.0, 1.0))
_count = st.integers(0, 10**6)
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def _maybe(**fields) -> st.SearchStrategy[dict]:
    """Dicts holding any subset of ``fields`` (absent, null or a value), plus unknown keys."""
    present = st.fixed_dictionaries({}, optional={k: st.none() | v for k, v in fields.items()})
    # a dash is in no field's name: these keys are unknown to every class
    unknown = st.dictionaries(st.text(max_size=6).map(lambda k: "x-" + k), _json, max_size=2)
    return st.builds(lambda a, b: {**b, **a}, present, unknown)


_cohort = st.builds(lambda facts, rest: {"facts": facts, **rest}, st.lists(_count, min_size=2, max_size=2),
                    _maybe(efficacy=_fraction, generalization=_fraction, specificity=_fraction))
_chat = _maybe(efficacy=_fraction, answer_new=_fraction, n_records=_count)
_retention = st.builds(lambda edits, rest: {"edits": edits, **rest}, _count, _maybe(
    step=_count, efficacy=_fraction, generalization=_fraction, specificity_vs_gold=_fraction, n_records=_count,
    seconds=st.floats(0, 1e5), by_cohort=st.lists(_cohort, max_size=3), chat=_chat))
_drift = _maybe(ppl=st.floats(1.0, 1e4), agreement=_fraction, n_tokens=_count)
_curve = st.builds(lambda edits, rest: {"edits": edits, **rest}, _count, _maybe(step=_count, drift=_drift))
_entry = st.builds(lambda status, retention, curve, rest: {"status": status, "retention": retention, "curve": curve,
                                                           **rest},
                   st.sampled_from(["done", "running"]), st.lists(_retention, max_size=3), st.lists(_curve, max_size=3),
                   _maybe(same_as=st.text(max_size=10), edited=_count, final_reused_from=st.text(max_size=10)))


@settings(max_examples=60, deadline=None)
@given(_entry)
def test_generated_entries_round_trip(entry: dict) -> None:
    typed = ConfigEntry.from_dict(entry)
    assert json.dumps(typed.to_dict()) == json.dumps(entry)  # the same keys, values and key order, at every level
    assert [p.edits for p in typed.retention] == [p["edits"] for p in entry["retention"]]
    assert all(isinstance(p, RetentionPoint) for p in typed.retention)


@settings(max_examples=60, deadline=None)
@given(_entry, st.data())
def test_a_generated_entry_with_one_wrong_value_is_refused_at_its_path(entry: dict, data) -> None:
    entry = copy.deepcopy(entry)
    points = [(kind, i) for kind in ("retention", "curve") for i in range(len(entry[kind]))]
    if not points:
        entry["curve"] = [{"edits": 1}]
        points = [("curve", 0)]
    kind, i = data.draw(st.sampled_from(points))
    entry[kind][i]["edits"] = data.draw(st.text(max_size=4) | st.floats(0.5, 2.5) | st.booleans())
    with pytest.raises(ResultsFileError, match=rf"^run\.json: {kind}\[{i}\]\.edits: expected an integer, got "):
        ConfigEntry.from_dict(entry, source="run.json")


def test_the_report_reads_the_typed_file_as_it_read_the_dict(tmp_path: Path) -> None:
    folder = shutil.copytree(SMALL, tmp_path / "copy")
    raw = json.loads((folder / "results.json").read_text("utf-8"))
    assert markdown(load_results(folder)) == markdown(raw)
