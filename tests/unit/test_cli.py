"""The ``seqedit`` command line on a tiny llama saved to disk: help, edit, generate, stats, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from seqedit import dump_facts, load_model
from seqedit.cli import app
from seqedit.evaluate.scoring import greedy_completions
from seqedit.datasets import load_facts
from seqedit.shared_data import counterfact_path, wikitext_path
from seqedit.locate.stats import layer_stats
from seqedit.testing import tiny_model

COMMANDS = (
    "edit", "generate", "stats", "verify-equivalence", "bench", "demo",  # cli/edit.py, equivalence.py, bench.py
    "forget", "undo", "rekey", "refresh", "log", "verify", "constraint-fit", "export",  # cli/ledger.py
    "eval", "report", "compare",  # cli/evaluate.py
    "serve",  # cli/serve.py
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a bad model name must never reach the network


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama saved as a plain HF directory (its name matches no preset: default layers)."""
    path = tmp_path_factory.mktemp("tiny-model")
    lm = tiny_model("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dump_facts(load_facts(counterfact_path(), limit=3), tmp_path_factory.mktemp("facts") / "facts.jsonl")


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def invoke_json(*args: str | Path) -> dict:
    """Run a command with ``--json``; it must succeed and print exactly one JSON document on stdout."""
    result = invoke(*args, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def assert_clean_failure(result: Result, *named: str | Path) -> None:
    """Exit code 2, an ``error:`` line on stderr naming ``named`` (Rich may wrap it), no traceback."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and not result.stdout
    assert "error:" in result.stderr
    for name in named:
        assert flat(str(name)) in flat(result.stderr)


def flat(text: str) -> str:
    """``text`` without any whitespace: Rich wraps long lines at the terminal width."""
    return "".join(text.split())


def test_every_command_is_listed() -> None:
    registered = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert registered == set(COMMANDS)
    top = invoke("--help")
    assert top.exit_code == 0 and all(c in top.stdout for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_shows_usage_and_summary(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert f"{command} [OPTIONS]" in result.stdout
    # log, report and compare read a ledger / results folders only; every other command loads a model
    assert ("--model" in result.stdout) == (command not in ("log", "report", "compare"))
    callback = next(c.callback for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    assert flat(callback.__doc__.splitlines()[0]) in flat(result.stdout)


def test_edit_reports_steps_and_saves_the_edited_model(model_dir: Path, facts_file: Path, tmp_path: Path) -> None:
    saved = tmp_path / "edited"
    data = invoke_json(
        "edit", facts_file, "--model", model_dir, "--layers", "1,2", "--n", "3", "--batch-size", "2",
        "--lam", "10", "--save", saved,
    )
    assert data["model"] == str(model_dir) and data["method"] == "memit/aligned" and data["mode"] == "sequential"
    assert data["hparams"]["layers"] == [1, 2] and data["hparams"]["lam"] == 10.0
    steps = data["steps"]
    assert [s["id"] for s in steps] == [1, 2] and [s["n_facts"] for s in steps] == [2, 1]
    assert [i for s in steps for i in s["fact_ids"]] == ["cf-0", "cf-1", "cf-2"]
    for s in steps:
        assert set(s["seconds"]) == {"templates", "values", "keys", "solve", "apply", "total"}
        assert s["final_residual"] < s["target_norm"]
    assert data["saved"] == str(saved)

    base, edited = load_model(str(model_dir), device_map="cpu"), load_model(str(saved), device_map="cpu")
    before = dict(base.model.named_parameters())
    diff = {n for n, p in edited.model.named_parameters() if not torch.equal(p, before[n])}
    assert diff == {f"{base.adapter.ffn_out_name(l)}.weight" for l in (1, 2)}


def test_generate_json_matches_the_api(model_dir: Path) -> None:
    data = invoke_json("generate", "Hello", "--model", model_dir)
    expected = greedy_completions(load_model(str(model_dir), device_map="cpu"), ["Hello"], 12)
    assert data == {"model": str(model_dir), "completions": {"Hello": expected[0]}}


def test_stats_json_matches_the_api(model_dir: Path) -> None:
    data = invoke_json("stats", "--model", model_dir, "--layers", "1,2", "--tokens", "500")
    assert data["corpus"] == str(wikitext_path("valid"))
    assert set(data["layers"]) == {"1", "2"}
    st = layer_stats(load_model(str(model_dir), device_map="cpu"), (1, 2), wikitext_path("valid"), 500, 256)
    for layer, row in data["layers"].items():
        assert row["d_in"] == 64 and row["tokens"] == st[int(layer)].count >= 500
        assert row["trace"] == pytest.approx(float(st[int(layer)].sigma0.trace()), rel=1e-12)


def test_missing_facts_file_is_exit_2_naming_it(model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-facts.jsonl"
    assert_clean_failure(invoke("edit", missing, "--model", model_dir), missing)


@pytest.mark.parametrize("folder", ["runs[v2]", "runs[/v2]"])
def test_error_messages_keep_brackets(model_dir: Path, tmp_path: Path, folder: str) -> None:
    missing = tmp_path / folder / "facts.jsonl"
    assert_clean_failure(invoke("edit", missing, "--model", model_dir), missing)


def test_bad_layers_flag_is_a_usage_error(model_dir: Path, facts_file: Path) -> None:
    result = invoke("edit", facts_file, "--model", model_dir, "--layers", "1,two")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert flat("comma-separated integers") in flat(result.output)


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_unknown_model_directory_is_a_clean_error(tmp_path: Path, kind: str) -> None:
    where = tmp_path / "no-model-here"
    if kind == "empty":
        where.mkdir()
    assert_clean_failure(invoke("generate", "Hello", "--model", where), where)


def test_demo_asks_every_edited_fact_through_the_chat_template(model_dir: Path) -> None:
    """The demo's chat answers cover all the facts it edits, not a pick (it showed only the first)."""
    from seqedit.locate.chat import question_template

    result = invoke("demo", "--model", model_dir, "--n", "2")
    assert result.exit_code == 0, (result.output, result.exception)
    assert flat("(prompt format: both)") in flat(result.stdout)
    assert flat("the same facts asked through the chat template") in flat(result.stdout)
    for f in load_facts(counterfact_path(), split="train", limit=2):
        assert flat(f"user: {question_template(f.text)}") in flat(result.stdout)
        assert flat(f"the new target '{f.target}')") in flat(result.stdout)


@pytest.mark.parametrize("flags, expected", [
    (["--set", "lam=3000"], {"lam": 3000.0}),  # was dropped: the unset --lam (None) replaced it
    (["--set", "lam=3000", "--set", "continuation_kl=0"], {"lam": 3000.0, "continuation_kl": 0.0}),
    (["--lam", "3000", "--set", "continuation_kl=0"], {"lam": 3000.0, "continuation_kl": 0.0}),
    (["--set", "layers=3,4", "--set", "v_steps=7"], {"layers": (3, 4), "v_steps": 7}),
    (["--lam", "3000", "--set", "lam=3000"], {"lam": 3000.0}),
])
def test_eval_set_overrides_reach_the_config(tmp_path, monkeypatch: pytest.MonkeyPatch, flags, expected) -> None:
    import seqedit.evaluate.results as results

    seen = {}

    def stop(config, out_dir):
        seen["overrides"] = config.overrides
        raise SystemExit(0)  # before the model loads

    monkeypatch.setattr(results, "check_out_dir", stop)
    result = invoke("eval", "--out", tmp_path / "run", *flags)
    assert result.exit_code == 0, result.output
    assert seen["overrides"] == expected


def test_eval_and_bench_refuse_a_flag_and_a_set_that_disagree(tmp_path) -> None:
    for cmd in (["eval", "--out", tmp_path / "run"], ["bench"]):
        assert_clean_failure(invoke(*cmd, "--lam", "3000", "--set", "lam=1500"), "--lam", "lam=1500", "disagree")
    assert not (tmp_path / "run").exists()


def test_bench_preflight_checks_layers_given_with_set(model_dir: Path) -> None:
    # the preflight saw only --layers, so a --set layers= out of range failed only after the model loaded
    assert_clean_failure(invoke("bench", "--model", model_dir, "--set", "layers=99"), "--layers 99")
