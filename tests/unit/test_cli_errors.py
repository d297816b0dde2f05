"""Issue 13's cases, one test each: bad input gives one ``error:`` line and exit 2 (a failed check exit 1),
before the model loads when no model is needed to see it, and leaves no file behind or changed."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from cli_helpers import (
    assert_refused, committed_ledger, copy_tree, digests, error_lines, invoke, no_model_load, save_tiny_model,
)

from seqedit import Fact, dump_facts

__all__ = ["no_model_load"]  # the fixture, imported for pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def base_ledger(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return committed_ledger(model_dir, tmp_path_factory.mktemp("ledgers") / "L")


@pytest.fixture
def ledger(base_ledger: Path, tmp_path: Path) -> Path:
    return copy_tree(base_ledger, tmp_path / "L")


def facts_file(path: Path, facts: list[Fact]) -> Path:
    return dump_facts(facts, path)


GOOD = [Fact("{} is located in", "Place 90", "Town 90"), Fact("{} is located in", "Place 91", "Town 91")]


# ---------------------------------------------------------------- facts files
def test_non_utf8_facts_file_names_the_file(tmp_path: Path, model_dir: Path, no_model_load) -> None:
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "{} is in", "subject": "Zürich", "target": "Bern"}\n'.encode("latin-1"))
    line = assert_refused(invoke("edit", bad, "--model", model_dir), str(bad), "not UTF-8")
    assert "line 1" in line


@pytest.mark.parametrize("how", ["empty file", "--n 0"])
def test_empty_input_is_refused_before_the_model_and_creates_no_ledger(
        tmp_path: Path, model_dir: Path, how: str, no_model_load) -> None:
    if how == "empty file":
        facts, extra = tmp_path / "empty.jsonl", []
        facts.write_text("")
    else:
        facts, extra = facts_file(tmp_path / "f.jsonl", GOOD), ["--n", "0"]
    r = invoke("edit", facts, "--model", model_dir, "--ledger", tmp_path / "new-ledger", *extra)
    assert_refused(r, "no facts" if how == "empty file" else "--n")
    assert not (tmp_path / "new-ledger").exists()


def test_unknown_preset_is_refused_before_the_model(tmp_path: Path, model_dir: Path, no_model_load) -> None:
    facts = facts_file(tmp_path / "f.jsonl", GOOD)
    assert_refused(invoke("edit", facts, "--model", model_dir, "--preset", "paper"), "--preset: ",
                   "has no named presets (variant 'paper')")
    # (bench of a plain facts file used to fail on its default --split train, which is CounterFact's)
    assert_refused(invoke("bench", "--facts", facts, "--model", model_dir, "--preset", "paper"), "--preset")


def test_exact_duplicate_facts_are_refused(tmp_path: Path, model_dir: Path, no_model_load) -> None:
    facts = facts_file(tmp_path / "dup.jsonl", [GOOD[0], GOOD[1], GOOD[0]])
    assert_refused(invoke("edit", facts, "--model", model_dir), "facts 1 and 3 are the same edit")


@pytest.mark.parametrize("target", ["\u200b", " \u200b\u200d ", "\ufeff", "\u3164"])
def test_invisible_targets_are_refused(tmp_path: Path, model_dir: Path, target: str, no_model_load) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": "{} is in", "subject": "Paris", "target": target}) + "\n")
    assert_refused(invoke("edit", path, "--model", model_dir), "no visible character")


def test_a_fact_longer_than_max_prompt_tokens_is_refused_before_the_model(
        tmp_path: Path, model_dir: Path, no_model_load) -> None:
    long = Fact("{} is located in " + "very " * 200, "Place 1", "Town 1", id="long")
    facts = facts_file(tmp_path / "f.jsonl", [long])
    assert_refused(invoke("edit", facts, "--model", model_dir), "fact long is", "--max-prompt-tokens")
    assert invoke("edit", facts, "--model", model_dir, "--max-prompt-tokens", "5000").exit_code == 3  # went on to load


def test_generate_prompt_length_and_zero_new_tokens(model_dir: Path, no_model_load) -> None:
    assert_refused(invoke("generate", "Hello", "--model", model_dir, "--max-new-tokens", "0"), "--max-new-tokens")
    assert_refused(invoke("generate", "word " * 3000, "--model", model_dir), "prompt 1 is", "tokens long")
    assert_refused(invoke("generate", "\u200b", "--model", model_dir), "prompt 1", "no visible character")


# ---------------------------------------------------------------- options, before the model loads
@pytest.mark.parametrize("args, named", [
    (["--method", "nosuch"], "nosuch"),
    (["--layers", "99"], "--layers 99"),
    (["--layers", "1,x"], "comma-separated integers"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lam", "-1"], "lam must be >= 0"),
    (["--mode", "both"], "--mode 'both'"),
    (["--method", "prune", "--alignment", "naive", "--ledger", "{tmp}/new"], "finalize"),
    (["--model", "{tmp}/no/such/model"], "no model directory"),
    (["--model", "{facts}"], "is a file"),
    (["--save", "{facts}"], "--save"),
])
def test_option_errors_come_before_the_model_loads(
        tmp_path: Path, model_dir: Path, args: list[str], named: str, no_model_load) -> None:
    facts = facts_file(tmp_path / "f.jsonl", GOOD)
    args = [a.format(tmp=tmp_path, facts=facts) for a in args]
    assert_refused(invoke("edit", facts, "--model", model_dir, *args), named)
    assert not (tmp_path / "new").exists()


def test_an_alignment_that_contradicts_the_ledger_is_refused_before_the_model(
        tmp_path: Path, model_dir: Path, ledger: Path, no_model_load) -> None:
    before = digests(ledger)
    facts = facts_file(tmp_path / "f.jsonl", GOOD)
    assert_refused(invoke("edit", facts, "--ledger", ledger, "--model", model_dir, "--alignment", "naive"),
                   "refusing to continue it with memit/naive")
    assert_refused(invoke("edit", facts, "--ledger", ledger, "--model", model_dir, "--lam", "3"), "lam: ledger 10.0")
    assert digests(ledger) == before


def test_a_locked_ledger_is_refused_before_the_model(tmp_path: Path, model_dir: Path, ledger: Path,
                                                      no_model_load) -> None:
    import fcntl

    fd = os.open(ledger / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        facts = facts_file(tmp_path / "f.jsonl", GOOD)
        assert_refused(invoke("edit", facts, "--ledger", ledger, "--model", model_dir), "open for writing by another")
        assert_refused(invoke("forget", "f0-0", "--ledger", ledger), "open for writing by another")
    finally:
        os.close(fd)


@pytest.mark.parametrize("args, named", [
    (["forget", "nope"], "not in force"),
    (["undo", "9"], "has no step 9"),
    (["undo", "0"], "undo"),
    (["export", "{facts}"], "exists and is not an empty directory"),
    (["export", "{tmp}/out", "--delta", "--delta-dtype", "float16"], "--delta-dtype"),
    (["verify", "--tol", "-1"], "--tol"),
])
def test_ledger_command_errors_come_before_the_model_loads(
        tmp_path: Path, ledger: Path, args: list[str], named: str, no_model_load) -> None:
    before = digests(ledger)
    facts = facts_file(tmp_path / "f.jsonl", GOOD)
    args = [a.format(tmp=tmp_path, facts=facts) for a in args]
    assert_refused(invoke(*args, "--ledger", ledger), named)
    assert digests(ledger) == before


def test_a_failed_first_run_leaves_no_ledger(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from seqedit import Editor

    def boom(self, *a, **k):
        raise ValueError("the step failed")

    monkeypatch.setattr(Editor, "run", boom)
    facts = facts_file(tmp_path / "f.jsonl", GOOD)
    assert_refused(invoke("edit", facts, "--model", model_dir, "--ledger", tmp_path / "L"), "the step failed")
    assert not (tmp_path / "L").exists()
    (tmp_path / "empty").mkdir()
    assert_refused(invoke("edit", facts, "--model", model_dir, "--ledger", tmp_path / "empty"), "the step failed")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


# ---------------------------------------------------------------- damaged journals
def test_a_zero_length_journal_is_reported_and_never_written(tmp_path: Path, no_model_load) -> None:
    (tmp_path / "L").mkdir()
    (tmp_path / "L" / "ledger.sqlite").write_bytes(b"")
    assert_refused(invoke("log", "--ledger", tmp_path / "L"), "cannot read its journal")
    assert (tmp_path / "L" / "ledger.sqlite").stat().st_size == 0
    assert sorted(p.name for p in (tmp_path / "L").iterdir()) == ["ledger.sqlite"]
    r = invoke("verify", "--ledger", tmp_path / "L")
    assert r.exit_code == 1 and "Traceback" not in r.output and "FAILED" in r.stdout
    assert (tmp_path / "L" / "ledger.sqlite").stat().st_size == 0


def test_log_on_a_sound_ledger_writes_nothing(ledger: Path) -> None:
    before = digests(ledger)
    r = invoke("log", "--ledger", ledger, "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["in_force"]) == 4
    assert digests(ledger) == before  # not even SQLite's -wal / -shm files


@pytest.mark.parametrize("damage", ["truncated", "garbage page"])
def test_a_damaged_journal_gives_no_traceback(tmp_path: Path, model_dir: Path, ledger: Path, damage: str,
                                              no_model_load) -> None:
    db = ledger / "ledger.sqlite"
    data = bytearray(db.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 3]
    else:
        data[4096:8192] = bytes(range(256)) * 16  # page 2
    db.write_bytes(bytes(data))
    before = digests(ledger)
    assert_refused(invoke("log", "--ledger", ledger), str(ledger))
    facts = facts_file(tmp_path / "f.jsonl", GOOD)
    assert_refused(invoke("edit", facts, "--ledger", ledger, "--model", model_dir), str(ledger))
    r = invoke("verify", "--ledger", ledger, "--json")
    assert r.exit_code == 1 and "Traceback" not in r.output
    rep = json.loads(r.stdout)
    assert rep["ok"] is False and rep["problems"] and rep["problems"][0]["what"] == "ledger.sqlite"
    assert digests(ledger) == before


def test_a_changed_row_is_seen_by_verify_and_refused_by_edit(tmp_path: Path, model_dir: Path, ledger: Path,
                                                            no_model_load) -> None:
    """A fact's target changed inside a sound page: integrity_check passes, the content digest does not."""
    db = sqlite3.connect(ledger / "ledger.sqlite")
    with db:
        db.execute("UPDATE facts SET fact = replace(fact, 'Town 0-0', 'Town 9-9')")
    db.close()
    r = invoke("verify", "--ledger", ledger, "--json")
    assert r.exit_code == 1
    problems = json.loads(r.stdout)["problems"]
    assert problems == [{"what": "ledger.sqlite", "problem": problems[0]["problem"]}]
    assert "content digest does not match" in problems[0]["problem"]
    before = digests(ledger)
    facts = facts_file(tmp_path / "f.jsonl", GOOD)
    assert_refused(invoke("edit", facts, "--ledger", ledger, "--model", model_dir), "content digest")
    assert digests(ledger) == before


@pytest.mark.parametrize("table, column", [("facts", "fact"), ("steps", "info"), ("meta", "value")])
def test_a_text_value_turned_blob_is_damage_not_an_internal_error(ledger: Path, no_model_load, table: str,
                                                                  column: str) -> None:
    """A zeroed record header can make SQLite read a text column as a blob (CI's corruption campaign found
    one): verify, log and edit name the journal as damaged instead of failing to JSON-encode bytes."""
    db = sqlite3.connect(ledger / "ledger.sqlite")
    with db:
        db.execute(f"UPDATE {table} SET {column} = CAST({column} AS BLOB) WHERE rowid = (SELECT MIN(rowid) FROM {table})")
    db.close()
    before = digests(ledger)
    r = invoke("verify", "--ledger", ledger, "--json")
    assert r.exit_code == 1 and "internal error" not in r.output and "Traceback" not in r.output, r.output
    problems = json.loads(r.stdout)["problems"]
    assert problems[0]["what"] == "ledger.sqlite" and "blob" in problems[0]["problem"], problems
    assert_refused(invoke("log", "--ledger", ledger, "--json"), "blob")
    assert digests(ledger) == before


def test_verify_lists_every_bad_file_without_loading_the_model(ledger: Path, no_model_load) -> None:
    bad = sorted(p for p in ledger.rglob("*.safetensors"))[:3]
    for p in bad:
        p.write_bytes(p.read_bytes()[:-7])
    (ledger / "steps" / "step-000002.safetensors").unlink()
    r = invoke("verify", "--ledger", ledger)
    assert r.exit_code == 1 and "Traceback" not in r.output and "FAILED" in r.stdout
    r = invoke("verify", "--ledger", ledger, "--json")
    problems = {p["what"]: p["problem"] for p in json.loads(r.stdout)["problems"]}
    assert problems["steps/step-000002.safetensors"] == "missing"
    for p in bad:
        name = str(p.relative_to(ledger))
        if name != "steps/step-000002.safetensors":
            assert problems[name] == "checksum mismatch"


def test_verify_of_a_sound_ledger_is_ok(ledger: Path) -> None:
    r = invoke("verify", "--ledger", ledger, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["ok"] is True and rep["problems"] == [] and len(rep["layers"]) == 2


# ---------------------------------------------------------------- how errors print
def test_errors_are_one_line_even_when_long_and_not_a_terminal(tmp_path: Path, no_model_load) -> None:
    deep = tmp_path / ("a-rather-long-folder-name-" * 6) / "facts.jsonl"
    r = invoke("edit", deep, "--model", tmp_path)
    assert_refused(r, str(deep))
    assert len(error_lines(r)[0]) > 200


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path, model_dir: Path,
                                                                     no_model_load) -> None:
    facts = facts_file(tmp_path / "f.jsonl", GOOD)
    r = invoke("edit", facts, "--model", model_dir)  # the guard raises where the model would load
    lines = error_lines(r)
    assert r.exit_code == 3 and len(lines) == 1 and "internal error (ModelLoaded" in lines[0]
    assert "--debug" in lines[0]
    r = invoke("--debug", "edit", facts, "--model", model_dir)
    assert r.exit_code == 1 and type(r.exception).__name__ == "ModelLoaded"  # raised: the traceback shows


def test_progress_without_a_terminal_is_plain_lines(capsys: pytest.CaptureFixture) -> None:
    from seqedit.cli.common import progress_bars
    from seqedit.progress import Phase, ProgressEvent

    with progress_bars() as cb:
        cb(ProgressEvent(Phase.STEPS, total=2, start=True))
        cb(ProgressEvent(Phase.LAYERS, total=5, start=True))
        cb(ProgressEvent(Phase.LAYERS, advance=1))  # finer phases: at most one line per 30 s
        cb(ProgressEvent(Phase.STEPS, advance=1, total=2))
        cb(ProgressEvent(Phase.STATUS, message="scoring"))
        cb(ProgressEvent(Phase.STATUS, message="scoring"))
        cb(ProgressEvent(Phase.STEPS, advance=1, total=2))
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines == ["steps: 1/2 done", "scoring", "steps: 2/2 done"]


# ---------------------------------------------------------------- export and generate with a ledger
def test_delta_loader_resolves_the_recorded_base_and_carries_the_tokenizer(
        tmp_path: Path, model_dir: Path, ledger: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import subprocess
    import sys

    import seqedit.models.load as load_mod

    assert invoke("export", tmp_path / "delta", "--ledger", ledger, "--delta").exit_code == 0
    meta = json.loads((tmp_path / "delta" / "seqedit_delta.json").read_text())
    assert meta["base"]["name"] == str(model_dir)
    spec = importlib.util.spec_from_file_location("apply_delta", tmp_path / "delta" / "apply_delta.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # a recorded alias resolves through seqedit (the embedded model's name, here mapped to the tiny model)
    monkeypatch.setattr(load_mod, "embedded_dir", lambda: model_dir)
    mod.META["base"]["name"] = "smollm2-135m"
    assert mod.base_path() == str(model_dir) and mod.base_path("other/id") == "other/id"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, tmp_path / "delta" / "apply_delta.py", tmp_path / "edited"], check=True,
                   env=env, capture_output=True)
    assert (tmp_path / "edited" / "tokenizer.json").is_file() and (tmp_path / "edited" / "config.json").is_file()


def test_export_follows_the_umask(tmp_path: Path, ledger: Path) -> None:
    old = os.umask(0o027)
    try:
        assert invoke("export", tmp_path / "full", "--ledger", ledger).exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "full").stat().st_mode & 0o777 == 0o750


def test_generate_with_a_ledger_uses_its_edited_weights(model_dir: Path, ledger: Path) -> None:
    from seqedit import Editor, load_model
    from seqedit.evaluate.scoring import greedy_completions

    r = invoke("generate", "Place 0 is located in", "--ledger", ledger, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["completions"]["Place 0 is located in"]
    with Editor(load_model(str(model_dir), device_map="cpu"), ledger=ledger) as ed:
        assert got == greedy_completions(ed.loaded, ["Place 0 is located in"], 12)[0]
    plain = invoke("generate", "Place 0 is located in", "--model", model_dir, "--json")
    assert json.loads(plain.stdout)["model"] == str(model_dir)


def test_an_unreachable_hub_fails_fast_naming_the_model(monkeypatch: pytest.MonkeyPatch, no_model_load) -> None:
    import socket
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    t = time.perf_counter()
    assert_refused(invoke("generate", "Hi", "--model", "someorg/no-such-model"),
                   "'someorg/no-such-model' is no local directory", "cannot be reached")
    assert time.perf_counter() - t < 5


def test_eval_reads_its_facts_file_before_the_model(tmp_path: Path, model_dir: Path, no_model_load) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "{} is in", "subject": "Paris", "target": "\\u200b"}\n')
    assert_refused(invoke("eval", "--model", model_dir, "--out", tmp_path / "run", "--facts", bad, "--n", "1"),
                   str(bad), "no visible character")


def test_export_reads_the_umask_without_setting_it(tmp_path: Path, ledger: Path, monkeypatch) -> None:
    """Inside the threaded server another thread may create files while an export runs: the export must
    read the umask, never set it (Linux reports it in /proc/self/status)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("the OS does not report the umask; it can only be read by setting it")
    old = os.umask(0o027)
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
    try:
        assert invoke("export", tmp_path / "full", "--ledger", ledger).exit_code == 0
    finally:
        real(old)
    assert calls == []
    assert (tmp_path / "full").stat().st_mode & 0o777 == 0o750
