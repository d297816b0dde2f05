"""Shared by the CLI error, fuzz and corruption tests: a tiny llama saved to disk, a committed ledger on
it, invoking the CLI, the sha256 of every file of a directory, and a guard that fails when a command
loads a model it should have refused before."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from seqedit import load_model
from seqedit.cli import app
from seqedit.testing import tiny_model

from ledger_helpers import apply_facts, fact, make_editor


class ModelLoaded(Exception):
    """Raised by the guard in place of loading a model."""


def save_tiny_model(path: Path) -> Path:
    lm = tiny_model("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def committed_ledger(model_dir: Path, path: Path, steps: int = 2) -> Path:
    """A closed ledger of ``steps`` apply steps (two facts each) on the model saved at ``model_dir``."""
    ed = make_editor(path, lm=load_model(str(model_dir), device_map="cpu"), snapshot_every=1)
    for s in range(steps):
        apply_facts(ed, [fact(2 * s), fact(2 * s + 1)])
    ed.close()
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def digests(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_refused(result: Result, *named: str) -> str:
    """Exit 2, nothing on stdout, one ``error:`` line on stderr (the last; progress lines may come
    before it), no traceback, naming ``named``. Returns that line."""
    lines = error_lines(result)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not result.stdout, result.stdout
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], lines
    assert "Traceback" not in result.output and "internal error" not in lines[-1]
    for name in named:
        assert name in lines[-1], (name, lines[-1])
    return lines[-1]


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CLI model load raises :class:`ModelLoaded` (an internal error, exit 3, if reached)."""
    from seqedit import editor
    from seqedit.cli import edit, evaluate

    def guard(name: str, *args, **kwargs):
        raise ModelLoaded(f"the model {name} was loaded")

    for module in (edit, evaluate):
        monkeypatch.setattr(module, "load", guard)
    monkeypatch.setattr(editor, "load_model", guard)  # the ledger commands load through Editor.from_ledger
