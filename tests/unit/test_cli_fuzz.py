"""CLI fuzz: seeded malformed inputs (facts files of random bytes, wrong types, missing and extra fields,
huge fields, invalid Unicode; random option values) against edit, generate, forget, undo, rekey, log, verify,
export, eval, bench, stats, verify-equivalence and demo, on a tiny model saved to disk and a committed
ledger.

Every input is malformed, so every call must be refused: exit 2, one ``error:`` line, no traceback,
before any model loads (a guard stands in for the loader), and the ledger's files byte-identical
(sha256) with nothing added. ``SEQEDIT_FUZZ_N`` sets the number of inputs (default 1,000).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from typing import Callable

import pytest
from cli_helpers import assert_refused, committed_ledger, digests, invoke, no_model_load, save_tiny_model

__all__ = ["no_model_load"]

N = int(os.environ.get("SEQEDIT_FUZZ_N", "1000"))
BUDGET_S = 240.0  # the whole campaign; ~60 s on one core


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _record(i: int) -> dict:
    return {"prompt": "{} is located in", "subject": f"Place {i}", "target": f"Town {i}", "id": f"z{i}"}


_JUNK = [0, -1, 1.5, float("nan"), True, None, [], {}, ["a"], {"x": 1}, "", " ", "\u200b", "{}", "{} {}", "x" * 5000]


def _facts_text(rng: random.Random) -> tuple[str, bytes]:
    """``(kind, file bytes)`` of a malformed facts file."""
    recs = [_record(i) for i in range(rng.randint(1, 4))]
    kind = rng.choice([
        "random bytes", "invalid utf-8", "wrong type", "missing field", "extra field", "huge field",
        "lone surrogate", "invisible", "subject not in prompt", "braces", "duplicate", "non-object",
        "deep nesting", "truncated json", "empty", "bad id", "bad neighbors", "array of junk", "nan",
    ])
    r = rng.randrange(len(recs))
    if kind == "random bytes":
        return kind, bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    if kind == "wrong type":
        recs[r][rng.choice(["prompt", "subject", "target"])] = rng.choice([j for j in _JUNK if not isinstance(j, str)])
    elif kind == "missing field":
        del recs[r][rng.choice(["prompt", "subject", "target"])]
    elif kind == "extra field":
        recs[r][rng.choice(["foo", "Target", "answers", "case_id", "requested_rewrite"])] = rng.choice(_JUNK)
    elif kind == "huge field":
        recs[r][rng.choice(["prompt", "target"])] += " word" * rng.randint(300, 3000)
    elif kind == "invisible":
        recs[r][rng.choice(["target", "subject"])] = rng.choice(["\u200b", "\u200d\u200c", "\ufeff ", "\u3164", "\u2800"])
    elif kind == "subject not in prompt":
        recs[r]["prompt"] = "the capital is"
    elif kind == "braces":
        recs[r]["prompt"] = rng.choice(["{} and {}", "{x} {}", "{} }", "no subject {"])
    elif kind == "duplicate":
        recs.append(dict(recs[r], id=rng.choice([recs[r]["id"], "other"])))
    elif kind == "bad id":
        recs[r]["id"] = rng.choice([5, "", " ", [], {}])
    elif kind == "bad neighbors":
        recs[r]["neighbors"] = rng.choice(["x", [["a"]], [["a", "b", "c"]], [[1, 2]], 7])
    elif kind == "nan":
        return kind, b'{"prompt": "{} is in", "subject": "Paris", "target": NaN}\n'
    elif kind == "empty":
        return kind, rng.choice([b"", b"\n\n", b"   ", b"[]", b"\xef\xbb\xbf"])
    elif kind == "non-object":
        return kind, "\n".join(json.dumps(rng.choice(_JUNK[:12])) for _ in recs).encode()
    elif kind == "array of junk":
        return kind, json.dumps([rng.choice(_JUNK[:12]) for _ in recs]).encode()
    elif kind == "deep nesting":
        depth = rng.randint(2000, 20000)
        return kind, ("[" * depth + "]" * depth).encode()
    text = "\n".join(json.dumps(x) for x in recs) + "\n"
    if kind == "lone surrogate":
        text = text.replace("Town", "T\\ud800own", 1)
    if kind == "truncated json":
        text = text[: rng.randint(1, len(text) - 2)]
    data = text.encode()
    if kind == "invalid utf-8":
        at = rng.randrange(len(data))
        data = data[:at] + rng.choice([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf"]) + data[at:]
    return kind, data


_BAD_EDIT_OPTIONS: list[list[str]] = [
    ["--method", "nosuch"], ["--method", ""], ["--alignment", "sideways"], ["--method", "prune", "--alignment", "x"],
    ["--layers", "99"], ["--layers", "-1"], ["--layers", "2,1"], ["--layers", "1,1"], ["--layers", "a"], ["--layers", ","],
    ["--batch-size", "0"], ["--batch-size", "-3"], ["--batch-size", "1e3"], ["--lam", "-1"], ["--lam", "nan"],
    ["--lam", "x"], ["--v-steps", "0"], ["--mode", "both"], ["--n", "0"], ["--n", "-2"], ["--n", "x"],
    ["--format", "csv"], ["--split", "edit"], ["--max-prompt-tokens", "0"], ["--model", "{tmp}/nope"],
    ["--model", "../x y"], ["--model", "{facts}"], ["--save", "{facts}"], ["--ledger", "{facts}"],
    ["--ledger", "{notledger}"], ["--unknown-flag"], ["--prompt", "\u200b"], ["--prompt", "{long}"],
]


def _edit_bad_facts(rng: random.Random, ctx: dict) -> tuple[str, list]:
    kind, data = _facts_text(rng)
    path = ctx["tmp"] / f"facts-{ctx['i']}.jsonl"
    path.write_bytes(data)
    extra = ["--ledger", ctx["ledger"]] if rng.random() < 0.5 else []
    return f"edit facts: {kind}", ["edit", path, "--model", ctx["model"], *extra]


def _edit_bad_option(rng: random.Random, ctx: dict) -> tuple[str, list]:
    opt = rng.choice(_BAD_EDIT_OPTIONS)
    args = [a.format(**ctx) for a in opt]
    extra = ["--ledger", ctx["ledger"]] if rng.random() < 0.4 and "--ledger" not in opt else []
    return f"edit option {opt[0]}", ["edit", ctx["facts"], "--model", ctx["model"], *extra, *args]


def _ledger_command(rng: random.Random, ctx: dict) -> tuple[str, list]:
    L = ctx["ledger"]
    choice = rng.choice([
        ["forget", rng.choice(["nope", "", "f0-0 ", "F0-0", "\u200b", "x" * 300]), "--ledger", L],
        ["forget", "--ledger", L],
        ["undo", rng.choice(["0", "-1", "99", "x", "1.5", "", "3"]), "--ledger", L],
        ["undo", "1", "--ledger", ctx["notledger"]],
        ["log", "--ledger", rng.choice([ctx["notledger"], ctx["facts"], ctx["tmp"] / "none", ""])],
        ["log", "--ledger", L, "--json", "--extra"],
        ["verify", "--ledger", L, "--tol", rng.choice(["-1", "x", "nan?", ""])],
        ["verify", "--ledger", rng.choice([ctx["notledger"], ctx["facts"], ctx["tmp"] / "none"])],
        ["rekey", "--ledger", rng.choice([ctx["notledger"], ctx["facts"], ctx["tmp"] / "none", ""])],
        ["rekey", "--ledger", L, "--model", rng.choice([ctx["tmp"] / "nope", ctx["facts"]])],
        ["export", rng.choice([ctx["facts"], ctx["tmp"]]), "--ledger", L],
        ["export", ctx["tmp"] / f"out-{ctx['i']}", "--ledger", L, "--delta", "--delta-dtype", rng.choice(["f16", "int8", ""])],
        ["export", ctx["tmp"] / f"out-{ctx['i']}", "--ledger", L, "--model", rng.choice([ctx["tmp"] / "nope", ctx["facts"]])],
        ["generate", rng.choice(["", "\u200b", " ", ctx["long"]]), "--model", ctx["model"]],
        ["generate", "Hi", "--model", ctx["model"], "--max-new-tokens", rng.choice(["0", "-5", "x"])],
        ["generate", "Hi", "--ledger", rng.choice([ctx["notledger"], ctx["facts"]])],
        [rng.choice(["edit", "forget", "undo", "verify", "export", "eval", "nosuch"])],
        ["bench", "--model", ctx["model"], "--facts", ctx["facts"], *rng.choice([["--n", "0"], ["--layers", "9"],
                                                                              ["--batch-size", "-1"], ["--lam", "-2"]])],
        ["stats", "--model", ctx["model"], *rng.choice([["--tokens", "0"], ["--corpus", ctx["tmp"] / "none"],
                                                        ["--layers", "4"], ["--corpus", ctx["tmp"]]])],
        ["verify-equivalence", "--model", ctx["model"], "--facts", ctx["facts"],
         *rng.choice([["--batch-size", "0"], ["--method", "nosuch"], ["--stats-tokens", "0"], ["--layers", "1,x"]])],
        ["demo", "--n", rng.choice(["0", "-1", "x"])],
    ])
    return f"command {choice[0]}", choice


_BAD_EVAL_OPTIONS: list[list[str]] = [
    ["--dataset", "imagenet"], ["--n", "0"], ["--n", "x"], ["--batch-size", "0"], ["--methods", "nosuch"],
    ["--methods", ","], ["--alignment", "sideways"], ["--modes", "xx"], ["--modes", ","], ["--values", "later"],
    ["--general-scoring", "vibes"], ["--general-every", "-1"], ["--fluency-n", "-4"], ["--layout", "csv"],
    ["--zsre-target", "both"], ["--drift-windows", "-1"], ["--eval-batch-rows", "0"], ["--out", "{facts}"],
    ["--seed", "-1"], ["--fluency-tokens", "1"],
]


def _eval_bad_option(rng: random.Random, ctx: dict) -> tuple[str, list]:
    opt = [a.format(**ctx) for a in rng.choice(_BAD_EVAL_OPTIONS)]
    out = [] if "--out" in opt else ["--out", ctx["tmp"] / f"eval-{ctx['i']}"]
    return f"eval option {opt[0]}", ["eval", "--model", ctx["model"], *out, *opt]


_GENERATORS: list[tuple[float, Callable[[random.Random, dict], tuple[str, list]]]] = [
    (0.45, _edit_bad_facts), (0.25, _edit_bad_option), (0.2, _ledger_command), (0.1, _eval_bad_option),
]


def test_cli_fuzz_refuses_every_malformed_input_cleanly(tmp_path_factory: pytest.TempPathFactory, no_model_load) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    model = save_tiny_model(root / "model")
    ledger = committed_ledger(model, root / "L", steps=1)
    notledger = root / "not-a-ledger"
    notledger.mkdir()
    (notledger / "x.txt").write_text("x")
    facts = root / "good.jsonl"
    facts.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(3)))
    before = digests(ledger)
    ctx = {"tmp": root, "model": model, "ledger": ledger, "notledger": notledger, "facts": facts,
           "long": "word " * 3000}
    rng = random.Random(13)
    weights = [w for w, _ in _GENERATORS]
    kinds: Counter[str] = Counter()
    t0 = time.perf_counter()
    for i in range(N):
        ctx["i"] = i
        gen = rng.choices([g for _, g in _GENERATORS], weights)[0]
        kind, args = gen(rng, ctx)
        kinds[kind] += 1
        result = invoke(*args)
        try:
            assert_refused(result)
        except AssertionError as e:
            raise AssertionError(f"input {i} ({kind}): {[str(a)[:80] for a in args]}: {e}") from None
        if "--ledger" in [str(a) for a in args] or args[0] in ("forget", "undo", "rekey", "log", "verify", "export"):
            assert digests(ledger) == before, f"input {i} ({kind}) changed the ledger"
        assert time.perf_counter() - t0 < BUDGET_S, f"the fuzz ran over {BUDGET_S} s after {i + 1} inputs"
    print(f"\nfuzz: {N} inputs, 0 tracebacks, {time.perf_counter() - t0:.1f} s; by kind: {dict(sorted(kinds.items()))}")
    assert sum(kinds.values()) == N >= int(os.environ.get("SEQEDIT_FUZZ_MIN", "1000"))
