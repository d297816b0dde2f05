"""The API's door: the guards the CLI runs (seqedit.guards) refuse bad input in Editor.apply / run /
from_ledger and load_facts too, with the CLI's message and before any work; a new ledger directory
appears only with its first commit; an edit and a generate raise no warning at all."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
from ledger_helpers import apply_facts, committed_ledger, fact, make_editor

import seqedit.editor as editor_module
from seqedit import Editor, Fact, LedgerError, load_facts
from seqedit.errors import FactError, SeqEditError
from seqedit.guards import InputError, check_batch
from seqedit.ledger import Ledger
from seqedit.testing import tiny_model

KW = dict(layers=(1, 2), stats_tokens=2000, lam=10.0, v_steps=2)
A = Fact(prompt="{} is located in", subject="Place 1", target="Town 1")
B = Fact(prompt="{} is located in", subject="Place 2", target="Town 2")


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ duplicate facts
def test_apply_and_run_refuse_one_edit_twice_before_any_work() -> None:
    ed = Editor(tiny_model("llama"), **KW)
    same = Fact(prompt="{} is located in.", subject="place 1", target="town 1")  # the same slot and target
    for call in (lambda: ed.apply([A, same]), lambda: ed.run([B, A, same], batch_size=1)):
        with pytest.raises(FactError, match=r"^facts: facts \d and \d are the same edit \('place 1' -> 'town 1'\)"):
            call()
    with pytest.raises(FactError, match="facts 1 and 2 have the same id 'x'"):
        ed.run([A.with_id("x"), B.with_id("x")], batch_size=1)
    assert not ed.steps and not ed.bank.ready  # refused before Σ₀, before the first step


def test_the_cli_and_the_api_print_one_message(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(f.to_dict()) + "\n" for f in (A, B, A)))
    with pytest.raises(FactError) as api:
        load_facts(path, distinct=True)
    with pytest.raises(FactError) as guard:
        check_batch([A, B, A], str(path))
    assert str(api.value) == str(guard.value) == f"{path}: facts 1 and 3 are the same edit ('Place 1' -> 'Town 1')"
    assert len(load_facts(path)) == 3  # the dataset files repeat a few edits: off by default


def test_a_batch_that_is_not_facts_is_refused_by_type() -> None:
    ed = Editor(tiny_model("llama"), **KW)
    for bad in ("Place 1", A, {"prompt": "x"}, [A, "B"], 3):
        with pytest.raises(TypeError, match="facts"):
            ed.apply(bad)
    with pytest.raises(FactError, match="at least one fact"):
        ed.apply([])


# ------------------------------------------------------------------ the model's context
def test_a_fact_longer_than_the_context_is_refused_before_any_work(tmp_path: Path) -> None:
    from seqedit.models.load import wrap_model

    raw = tiny_model("llama")
    raw.model.config.max_position_embeddings = 24  # the fingerprint covers the config: wrap it anew
    lm = wrap_model(raw.model, raw.tokenizer, raw.name)
    long = Fact(prompt="{} is located in", subject="Place " + "one two three " * 10, target="Town 1")
    ed = Editor(lm, ledger=tmp_path / "L", **KW)
    with pytest.raises(InputError, match=r"^fact 1 is \d+ tokens long; the limit is 24 \(the model's context of 24 tokens\)$"):
        ed.apply([long])
    with pytest.raises(InputError, match="fact 2 is"):
        ed.run([A, long], batch_size=1)
    assert not ed.steps and not ed.bank.ready and not (tmp_path / "L").exists()


# ------------------------------------------------------------------ agreement with a ledger
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "alphaedit"}, "refusing to continue it with alphaedit/aligned"),
    ({"alignment": "naive"}, "refusing to continue it with memit/naive"),
    ({"ridge": 0.5}, r"refusing to continue it with memit/aligned \{.*'ridge': 0.5"),
    ({"lam": 20.0}, r"other hyperparameters \(lam: ledger 10.0, given 20.0\)"),
    ({"layers": (1, 3)}, r"other hyperparameters \(layers"),
    ({"prompt_format": "chat"}, "refusing to mix in 'chat' steps"),
    ({"mode": "both"}, "unknown mode 'both'"),
    ({"method": ""}, "method must be a non-empty string"),
])
def test_from_ledger_refuses_what_disagrees_before_loading_the_model(tmp_path: Path, monkeypatch, kwargs,
                                                                      message) -> None:
    committed_ledger(tmp_path / "L")
    before = _tree(tmp_path / "L")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(editor_module, "load_model", no_load)
    with pytest.raises(SeqEditError, match=message):
        Editor.from_ledger(tmp_path / "L", **kwargs)
    assert _tree(tmp_path / "L") == before


def test_from_ledger_refuses_a_held_ledger_and_a_missing_one_before_loading(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(editor_module, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(LedgerError, match="is not a seqedit ledger"):
        Editor.from_ledger(tmp_path / "nothing")
    with pytest.raises(TypeError, match="path must be a path"):
        Editor.from_ledger(3)
    ed = make_editor(tmp_path / "L")
    apply_facts(ed, [fact(0)])
    with pytest.raises(LedgerError, match="open for writing by another editor"):
        Editor.from_ledger(tmp_path / "L")
    ed.close()


# ------------------------------------------------------------------ a ledger appears with its first commit
def test_a_new_ledger_appears_only_with_its_first_commit(tmp_path: Path) -> None:
    path = tmp_path / "L"
    ed = make_editor(path)
    ed.prepare()  # Σ₀ waits in the bank until the ledger exists
    assert not path.exists()
    apply_facts(ed, [fact(0)])
    assert Ledger.exists(path) and ed.ledger.last_step == 1 and ed.verify().ok
    ed.close()
    with Ledger(path) as L:
        assert L.sigma0([1, 2]) is not None  # stored with the first step: a reopen does not re-estimate it


def test_an_editor_closed_or_refused_before_its_first_commit_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "L"
    make_editor(path).close()
    assert not path.exists()
    ed = make_editor(path)
    assert ed.ledger is not None and ed.facts_in_force() == []  # asking creates it ...
    ed.close()
    assert not path.exists()  # ... and closing an uncommitted one removes it
    (path).mkdir()
    ed = make_editor(path)
    with pytest.raises(FactError):
        ed.apply([A, A])
    with pytest.raises(ValueError, match="apply_kv got 1 facts"):
        ed.apply_kv(*_cols(ed, 2), facts=[fact(0)])
    assert path.is_dir() and not any(path.iterdir())  # an empty directory given stays, empty
    ed.close()


def _cols(ed: Editor, n: int):
    import torch

    K = {l: torch.zeros(64, n, dtype=torch.float64) for l in (1, 2)}
    return K, {l: torch.zeros(32, n, dtype=torch.float64) for l in (1, 2)}


def test_an_interrupted_first_step_takes_the_new_ledger_with_it(tmp_path: Path) -> None:
    path = tmp_path / "L"
    ed = make_editor(path)

    def interrupt(event):
        if event.phase.value == "layers" and Ledger.exists(path):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ed.apply([A], progress=interrupt)
    assert not path.exists()
    ed.apply([A])  # the editor goes on: the next step creates the ledger afresh
    assert ed.ledger.last_step == 1 and ed.verify().ok
    ed.close()


def test_two_editors_on_one_new_path_the_second_is_refused(tmp_path: Path) -> None:
    first, second = make_editor(tmp_path / "L"), make_editor(tmp_path / "L")
    apply_facts(first, [fact(0)])
    with pytest.raises(LedgerError, match="was created by another editor"):
        apply_facts(second, [fact(1)])
    first.close(), second.close()
    with Ledger(tmp_path / "L") as L:
        assert L.last_step == 1


# ------------------------------------------------------------------ no warning at all
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_edit_and_a_generate_raise_no_warning(family: str) -> None:
    from seqedit.evaluate.fluency import generate_texts
    from seqedit.evaluate.scoring import greedy_completions

    lm = tiny_model(family)
    logged = _Records()
    hf = logging.getLogger("transformers")
    hf.addHandler(logged)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the deprecated past_key_values= is a FutureWarning
            ed = Editor(lm, **KW)
            ed.apply([A])
            completions = greedy_completions(lm, ["Place 1 is located in"], 4)
            texts = generate_texts(lm, ["Place 1 is"], 4)
    finally:
        hf.removeHandler(logged)
    assert len(completions) == 1 and len(texts) == 1
    assert logged.seen == []  # transformers' logged deprecations (output.past_key_values) too


def test_a_failed_first_run_with_rekey_every_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "L"
    ed = make_editor(path)

    def interrupt(event):
        if event.phase.value == "layers":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ed.run([A], rekey_every=1, progress=interrupt)  # rekey_every asks for the session up front
    assert not path.exists()
    ed.close()
