"""Corruption campaign: seeded trials, each flipping, zeroing, appending or truncating bytes at a random
offset of a random file of a committed ledger (journal, write-ahead log, steps, snapshots, Σ₀), then
``seqedit verify --json`` and ``seqedit log``.

Whether a change matters is decided independently of seqedit: a tensor file matters if its bytes
changed; the journal (with its log) matters if SQLite, opening a scratch copy, reads other rows or
schema than before, or cannot read it. Verify must never answer OK when something that matters
changed; no call may print a traceback; nothing may be deleted. ``SEQEDIT_CORRUPT_N`` sets the number
of trials (default 200).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from cli_helpers import committed_ledger, invoke, save_tiny_model

from seqedit import Editor, load_model

N = int(os.environ.get("SEQEDIT_CORRUPT_N", "200"))
BUDGET_S = 300.0
_SQLITE_TRANSIENT = ("ledger.sqlite-wal", "ledger.sqlite-shm")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def journal_content(folder: Path, scratch: Path) -> object:
    """Schema and rows SQLite reads from ``folder``'s journal (and its log), on a scratch copy; the
    error's type if it cannot."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for name in ("ledger.sqlite", *_SQLITE_TRANSIENT):
        if (folder / name).exists():
            shutil.copy2(folder / name, scratch / name)
    try:
        db = sqlite3.connect(scratch / "ledger.sqlite")
        try:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            content = [list(db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name"))]
            content += [sorted(map(repr, db.execute(f'SELECT * FROM "{t}"'))) for t in tables]
            return content
        finally:
            db.close()
    except (sqlite3.Error, UnicodeDecodeError) as e:
        return type(e).__name__


# Bytes inside a row's text that can change while the page stays sound: checksums, fact texts, numbers.
_ROW_TEXT = re.compile(rb"[0-9a-f]{64}|Town [0-9]+-[0-9]+|Place [0-9]+|\"kv_dtype\": \"float64\"")


def corrupt(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    rows = list(_ROW_TEXT.finditer(data)) if path.name == "ledger.sqlite" else []
    op = rng.choice(["flip", "flip", "zero run", "truncate", "append"] + ["row text"] * 2 * bool(rows)) if data else "append"
    at = rng.randrange(len(data)) if data else 0
    if op == "row text":  # one character for another of its kind: valid UTF-8, valid JSON, a sound page
        m = rng.choice(rows)
        at = rng.randrange(m.start(), m.end())
        if chr(data[at]).isdigit():
            data[at] = ord(rng.choice([d for d in "0123456789" if ord(d) != data[at]]))
        else:
            data[at] = ord(rng.choice([c for c in "abcdef" if ord(c) != data[at]]))
    elif op == "flip":
        for i in range(at, min(len(data), at + rng.randint(1, 16))):
            data[i] ^= rng.randint(1, 255)
    elif op == "zero run":
        data[at : at + rng.randint(1, 512)] = bytes(len(data[at : at + 512][: rng.randint(1, 512)]))
    elif op == "truncate":
        del data[at:]
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    path.write_bytes(bytes(data))
    return op


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in _SQLITE_TRANSIENT}


def test_corruption_campaign(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("corrupt")
    model = save_tiny_model(root / "model")
    closed = committed_ledger(model, root / "closed", steps=3)
    # a copy taken while a writer holds the ledger: it carries the write-ahead log and its index
    live = Editor(load_model(str(model), device_map="cpu"), ledger=closed)
    open_copy = Path(shutil.copytree(closed, root / "open", ignore=shutil.ignore_patterns("lock")))
    live.close()
    assert (open_copy / "ledger.sqlite-wal").exists()
    bases = [closed, open_copy]
    truth = {b: journal_content(b, root / "scratch") for b in bases}
    for b in bases:  # on a copy: a verify of the weights opens the ledger for writing, which ends its log
        r = invoke("verify", "--ledger", shutil.copytree(b, root / f"check-{b.name}"), "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["ok"], r.output
    rng = random.Random(1313)
    tally: Counter[str] = Counter()
    t0 = time.perf_counter()
    for trial in range(N):
        base = rng.choice(bases)
        folder = Path(shutil.copytree(base, root / f"t{trial}"))
        # half the trials on the journal, whose damage is the subtle kind; the log when the copy has one
        tensors = sorted(folder.rglob("*.safetensors"))
        wal = folder / "ledger.sqlite-wal"
        roll = rng.random()
        target = folder / "ledger.sqlite" if roll < 0.5 else wal if roll < 0.6 and wal.exists() else rng.choice(tensors)
        before_bytes = target.read_bytes()
        op = corrupt(target, rng)
        name = str(target.relative_to(folder))
        if target.name.startswith("ledger.sqlite"):
            matters = journal_content(folder, root / "scratch") != truth[base]
        else:
            matters = target.read_bytes() != before_bytes
        files = _files(folder)

        r = invoke("verify", "--ledger", folder, "--json")
        where = f"trial {trial}: {op} of {name} ({'matters' if matters else 'harmless'})"
        assert "Traceback" not in r.output and "internal error" not in r.output, (where, r.output)
        assert r.exit_code in (0, 1), (where, r.exit_code, r.output)
        ok = r.exit_code == 0
        if r.stdout:
            assert json.loads(r.stdout)["ok"] is ok, where
        assert not (matters and ok), f"{where}: verify said OK"
        log = invoke("log", "--ledger", folder, "--json")
        assert log.exit_code in (0, 2) and "Traceback" not in log.output, (where, log.output)
        assert "internal error" not in log.output, (where, log.output)
        assert files <= _files(folder), f"{where}: deleted {sorted(files - _files(folder))}"
        kind = "journal" if name == "ledger.sqlite" else "log" if name.endswith("-wal") else name.split("/")[0]
        tally[f"{kind}: {'matters' if matters else 'harmless'}, verify {'OK' if ok else 'FAILED'}"] += 1
        shutil.rmtree(folder)
        assert time.perf_counter() - t0 < BUDGET_S, f"over {BUDGET_S} s after {trial + 1} trials"
    print(f"\ncorruption: {N} trials, 0 tracebacks, 0 false OKs, {time.perf_counter() - t0:.1f} s: {dict(tally)}")
    assert sum(tally.values()) == N >= int(os.environ.get("SEQEDIT_CORRUPT_MIN", "200"))
