"""The README's code blocks run: every ``python`` block executes (in a subprocess, on a tiny model, with
few facts and cheap hyperparameters: the README's calls and their order are kept), every ``seqedit``
command line of the ``bash`` blocks parses against the real CLI (options exist, values convert), and
every ``make`` target it names exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import typer.exceptions

from seqedit.cli import app

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text("utf-8")
# A block right after `<!-- readme-test: needs a running server -->` talks to a live `seqedit serve`:
# it is compiled, not run (tests/unit/test_serve_api.py drives the same OpenAI client against the app).
_FENCES = re.findall(r"(<!-- readme-test: needs a running server -->\n)?```(\w+)\n(.*?)```", README, re.S)
BLOCKS = [(kind, body) for marker, kind, body in _FENCES if not marker]
SERVER_BLOCKS = [body for marker, kind, body in _FENCES if marker and kind == "python"]
# programs a bash block may run besides seqedit (installing, writing a token file, calling the service)
_OTHER_PROGRAMS = {"pip", "printf", "curl", "openssl", "export"}

# Stands in for what would take minutes: the embedded model is a tiny llama, facts files are capped at
# four facts, the preset is two layers with a small Σ₀ budget. `hf_model`, `hf_tokenizer` and
# `my_hook` are the README's placeholders.
_PRELUDE = '''
import seqedit, seqedit.editor
from seqedit.testing import tiny_model
from seqedit.shared_data import shared_data_dir

seqedit.load_model = seqedit.editor.load_model = lambda name="smollm2-135m", **kw: tiny_model("llama")
_load_facts = seqedit.load_facts
seqedit.load_facts = lambda path, **kw: _load_facts(
    str(path).replace("../shared/data", str(shared_data_dir())), **{**kw, "limit": min(kw.get("limit") or 4, 4)})
seqedit.editor.preset_for = lambda name, n: seqedit.EditHParams(layers=(1, 2), lam=10.0, stats_tokens=2000, v_steps=2)
_tiny = tiny_model("llama")
hf_model, hf_tokenizer = _tiny.model, _tiny.tokenizer
class my_hook:
    seen = []
    @staticmethod
    def on_step_end(editor, report, position):
        my_hook.seen.append(report.id)
'''


def test_the_readme_has_the_blocks_this_test_reads() -> None:
    kinds = [k for k, _ in BLOCKS]
    assert kinds.count("python") >= 2 and kinds.count("bash") >= 2


def test_python_blocks_run(tmp_path: Path) -> None:
    code = _PRELUDE + "\n".join(body for kind, body in BLOCKS if kind == "python")
    code += "\nassert seqedit.Editor(hf_model, hf_tokenizer, callbacks=[my_hook]).run(facts[:2]) and my_hook.seen\n"
    code += "print('README OK', len(facts), [p.name for p in __import__('pathlib').Path('edited-model').iterdir()])\n"
    script = tmp_path / "readme.py"
    script.write_text(code)
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    import os

    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**os.environ, **env},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "README OK 4" in r.stdout and "config.json" in r.stdout


def test_server_blocks_compile() -> None:
    assert SERVER_BLOCKS  # the OpenAI client example
    for body in SERVER_BLOCKS:
        compile(body, "README.md", "exec")


def _command_lines() -> list[str]:
    lines = []
    for kind, body in BLOCKS:
        if kind != "bash":
            continue
        text = body.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            lines += [part.strip() for part in line.split(" · ") if part.strip()]
    return lines


def test_every_seqedit_command_line_parses() -> None:
    group = typer.main.get_command(app)
    seen = 0
    for line in _command_lines():
        words = shlex.split(line.replace("[", "").replace("]", ""))
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), re.M), line
            continue
        if words[0] == "torchrun":  # a launcher running the CLI module: check what it passes to seqedit
            words = ["seqedit", *words[words.index("seqedit.cli") + 1:]]
        if words[0] in _OTHER_PROGRAMS or re.match(r"^[A-Z_]+=", words[0]):
            continue
        assert words[0] == "seqedit", line
        args = ["1" if w == "STEP" else w for w in words[1:]]
        with group.make_context("seqedit", list(args), resilient_parsing=False) as ctx:
            cmd = group.get_command(ctx, args[0])
            assert cmd is not None, line
            cmd.make_context(args[0], args[1:], parent=ctx)  # parses and converts every option: raises if wrong
        seen += 1
    assert seen >= 12


@pytest.mark.parametrize("bad", ["seqedit edit FACTS.jsonl --no-such-flag", "seqedit undo STEPX -l edits/"])
def test_the_parse_check_catches_a_wrong_line(bad: str) -> None:
    group = typer.main.get_command(app)
    words = shlex.split(bad)
    with pytest.raises(typer.exceptions.TyperException):  # a usage error of the parser typer ships
        with group.make_context("seqedit", words[1:]) as ctx:
            group.get_command(ctx, words[1]).make_context(words[1], words[2:], parent=ctx)


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_in_the_docs_resolves() -> None:
    """README.md and every page of docs/ (results included): a relative link names an existing file."""
    root = Path(__file__).resolve().parents[2]
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(root)} → {target}")
    assert not broken, "\n".join(broken)
