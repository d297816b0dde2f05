"""API fuzz (hypothesis): malformed ``Fact`` fields and batches through ``Editor.apply`` / ``Editor.run``,
malformed options and hyperparameter overrides through ``Editor(...)``, malformed keyword arguments and
paths through ``Editor.from_ledger``, malformed facts files and arguments through ``load_facts``.

Every call either succeeds (an option set that happens to be valid) or raises a ``SeqEditError``, or a
``ValueError``/``TypeError`` whose message names the argument; no step is taken (every batch is made
invalid), no model is loaded by ``from_ledger`` for a refused call, and every ledger's files are
byte-identical afterwards (sha256), with nothing added. ``SEQEDIT_API_FUZZ_N`` sets the examples per
campaign (default 250: 1,000 inputs in all, ~30 s on one core); the counts print with ``-s``.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
import torch
from cli_helpers import digests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_helpers import apply_facts, committed_ledger, fact, make_editor
from test_cli_fuzz import _facts_text

import seqedit.editor as editor_module
from seqedit import Editor, Fact, load_facts
from seqedit.errors import SeqEditError
from seqedit.testing import tiny_model

N = int(os.environ.get("SEQEDIT_API_FUZZ_N", "250"))
FUZZ = settings(max_examples=N, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
COUNTS: Counter = Counter()

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=6), st.lists(st.integers(-2, 9), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["", " ", "\u200b", "\ufeff", "\u3164", "{}", "{} {}", "{x}", "\ud800", "x" * 3000, "nan"]),
)


class Reached(BaseException):
    """from_ledger got past every check to the model load (stands in for the loader)."""


def _outcome(call, names: tuple[str, ...]) -> str:
    """Run ``call``; an exception must be a SeqEditError, or a ValueError/TypeError naming one of ``names``."""
    try:
        call()
    except SeqEditError as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return f"refused: {type(e).__name__}"
    except (ValueError, TypeError) as e:
        assert any(n in str(e) for n in names), f"{type(e).__name__} names none of {names}: {e}"
        return f"refused: {type(e).__name__}"
    return "accepted"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A ledger held by an editor (apply/run), a free ledger (options, from_ledger), their digests."""
    root = tmp_path_factory.mktemp("api-fuzz")
    held = make_editor(root / "held")
    apply_facts(held, [fact(0), fact(1)])
    committed_ledger(root / "free")
    lm = tiny_model("llama")
    state0 = {k: v.clone() for k, v in lm.model.state_dict().items()}
    sums = {p: digests(root / p) for p in ("held", "free")}
    yield dict(root=root, held=held, lm=lm, state0=state0, sums=sums)
    held.close()
    print("\nAPI fuzz counts:", dict(sorted(COUNTS.items())))


def _unchanged(world) -> None:
    for p, before in world["sums"].items():
        assert digests(world["root"] / p) == before, f"ledger {p} changed"
    assert sorted(q.name for q in world["root"].iterdir()) == ["free", "held"], "a path was created"


# ------------------------------------------------------------------ facts and batches: Editor.apply / run
FIELDS = ("prompt", "subject", "target", "true_target", "paraphrases", "neighbors", "generation_prompts", "id", "meta")
GOOD = {"prompt": "{} is located in", "subject": "Place 7", "target": "Town 7"}


@st.composite
def a_fact(draw):
    """A Fact (valid or not: its constructor refusing is one outcome), or the item itself when it is junk."""
    kw = {k: (draw(JUNK) if draw(st.booleans()) else v) for k, v in GOOD.items()}
    for k in draw(st.lists(st.sampled_from(FIELDS[3:]), max_size=3, unique=True)):
        kw[k] = draw(JUNK)
    if draw(st.integers(0, 5)) == 0:
        kw["subject"] = "Place " + "one two " * draw(st.integers(300, 900))  # past the context of 1024
        kw["prompt"] = "{} is located in"
    try:
        return Fact(**kw)
    except (SeqEditError, TypeError) as e:
        COUNTS["Fact(...) refused"] += 1
        assert isinstance(e, SeqEditError) or "must be" in str(e) or "argument" in str(e), e
        return draw(st.sampled_from([kw, None, "a fact", 3]))


@st.composite
def a_bad_batch(draw):
    """A batch with at least one reason to be refused before any work."""
    items = draw(st.lists(a_fact(), max_size=4))
    facts = [f for f in items if isinstance(f, Fact)]
    how = draw(st.sampled_from(["duplicate", "junk item", "empty", "not a list", "too long"]))
    if how == "duplicate" and facts:
        items.insert(draw(st.integers(0, len(items))), draw(st.sampled_from(facts)))
    elif how == "too long" or (how == "duplicate" and not facts):
        items.append(Fact(prompt="{} is in", subject="word " * 1500, target="x"))
    elif how == "junk item":
        items.insert(draw(st.integers(0, len(items))), draw(JUNK))
    elif how == "empty":
        items = []
    else:
        items = draw(st.one_of(JUNK, st.just(Fact(**GOOD)), st.just({"prompt": "x"})))
    return how, items


@FUZZ
@given(case=a_bad_batch(), call=st.sampled_from(["apply", "run"]), batch_size=st.one_of(st.integers(1, 4), JUNK))
def test_malformed_facts_through_apply_and_run(world, case, call, batch_size) -> None:
    how, batch = case
    ed = world["held"]
    steps = ed.ledger.last_step
    if call == "apply":
        out = _outcome(lambda: ed.apply(batch), ("facts", "Fact"))
    else:
        out = _outcome(lambda: ed.run(batch, batch_size=batch_size), ("facts", "Fact", "batch_size"))
    if how == "empty" and call == "run" and out == "accepted":
        out = "accepted: an empty sequential run (no step)"
    assert out != "accepted", f"{call} took a malformed batch ({how}): {batch!r:.200}"
    assert ed.ledger.last_step == steps
    COUNTS[f"{call} {how}: {out}"] += 1
    _unchanged(world)


# ------------------------------------------------------------------ options and overrides: Editor(...)
HP = ("layers", "lam", "v_steps", "v_lr", "kl_factor", "clamp_norm_factor", "n_context_templates", "stats_tokens",
      "v_compute_dtype", "format_columns", "early_stop_loss", "key_batch_rows")
VALID = {"layers": (1, 2), "lam": 10.0, "v_steps": 2, "stats_tokens": 2000}


@st.composite
def options(draw):
    kw = {}
    for name, good in (("method", st.sampled_from(["memit", "alphaedit", "rlsedit", "nope", "MEMIT"])),
                       ("alignment", st.sampled_from(["aligned", "naive", "x"])),
                       ("mode", st.sampled_from(["sequential", "one_time", "both"])),
                       ("prompt_format", st.sampled_from(["bare", "chat", "Chat"])),
                       ("kv_dtype", st.sampled_from(["float64", "float32", "int8"])),
                       ("snapshot_every", st.integers(-1, 20)),
                       ("method_options", st.dictionaries(st.sampled_from(["ridge", "mu2", "bogus"]), JUNK, max_size=2))):
        if draw(st.integers(0, 3)) == 0:
            kw[name] = draw(st.one_of(good, JUNK))
    for name in draw(st.lists(st.sampled_from(HP), max_size=3, unique=True)):
        kw[name] = draw(st.one_of(JUNK, st.sampled_from([VALID.get(name, 1), (1, 3), (0, 9), -1.0, 0])))
    if draw(st.integers(0, 5)) == 0:
        kw[draw(st.sampled_from(["bogus_option", "ridge", "lamb"]))] = draw(JUNK)
    return kw


@FUZZ
@given(kw=options(), where=st.sampled_from(["none", "free", "new"]))
def test_malformed_options_through_the_constructor(world, kw, where) -> None:
    ledger = {"none": None, "free": world["root"] / "free", "new": world["root"] / "new"}[where]
    lm = world["lm"]
    built = []

    def construct() -> None:
        built.append(Editor(lm, ledger=ledger, **{**VALID, **kw}))

    out = _outcome(construct, tuple(kw) + ("mode", "layer", "lam", "hyperparameter", "method", "option"))
    for ed in built:
        ed.close()
    if built:
        lm.model.load_state_dict(world["state0"])  # a reopened ledger restored its edits into the model
    COUNTS[f"Editor(ledger={where}): {out}"] += 1
    _unchanged(world)


# ------------------------------------------------------------------ from_ledger
@FUZZ
@given(kw=options(), path=st.sampled_from(["free", "held", "missing", "file", "junk"]), extra=st.dictionaries(
    st.sampled_from(["model", "dtype", "device_map"]), JUNK, max_size=2))
def test_malformed_arguments_through_from_ledger(world, monkeypatch_module, kw, path, extra) -> None:
    root = world["root"]
    target = {"free": root / "free", "held": root / "held", "missing": root / "missing",
              "file": root / "free" / "ledger.sqlite", "junk": 3}[path]
    try:
        out = _outcome(lambda: Editor.from_ledger(target, **{**kw, **extra}),
                       tuple(kw) + ("path", "mode", "method", "hyperparameter", "option"))
    except Reached:
        out = "passed the checks, reached the model load"
    COUNTS[f"from_ledger({path}): {out}"] += 1
    _unchanged(world)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()

    def load(*a, **k):
        raise Reached

    mp.setattr(editor_module, "load_model", load)
    yield mp
    mp.undo()


# ------------------------------------------------------------------ load_facts
@FUZZ
@given(seed=st.integers(0, 2**32), args=st.dictionaries(
    st.sampled_from(["format", "split", "limit", "on_error", "zsre_target", "distinct"]),
    st.one_of(JUNK, st.sampled_from(["auto", "plain", "zsre-mend", "train", "skip", "alt", 2, True])), max_size=3),
    as_records=st.booleans())
def test_malformed_facts_files_through_load_facts(world, tmp_path_factory, seed, args, as_records) -> None:
    kind, data = _facts_text(random.Random(seed))
    path = tmp_path_factory.mktemp("f") / "facts.jsonl"
    path.write_bytes(data)
    source = path
    if as_records:
        source = [{"prompt": "{} is in", "subject": str(seed), "target": data[:20].decode("latin-1")}, data[:5], None]
    got = []
    out = _outcome(lambda: got.append(load_facts(source, **args)), tuple(args) + ("facts", "load_facts"))
    if out == "accepted":
        assert all(isinstance(f, Fact) for f in got[0])
    COUNTS[f"load_facts({'records' if as_records else kind}): {out}"] += 1
    _unchanged(world)


def test_the_held_ledger_still_verifies(world) -> None:
    assert world["held"].verify().ok and torch.is_tensor(world["held"].master[1])
