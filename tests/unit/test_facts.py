"""Tests of seqedit.facts: Fact validation and normalisation, the loaders on the real shared data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from seqedit.errors import FactError, SeqEditError
from seqedit.datasets import FORMATS, dump_facts, load_facts
from seqedit.facts import Fact
from seqedit.shared_data import counterfact_path, shared_data_dir, wikitext_path, zsre_path

DANIELLE = dict(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target="English")


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ Fact


def test_fact_normalises_fields() -> None:
    fact = Fact(
        prompt="  The mother tongue of {} is ",
        subject=" Danielle Darrieux",
        target=" English",
        true_target=" ",
        paraphrases=["Danielle Darrieux speaks"],
        neighbors=[["Michel Rocard is a native speaker of", " French"]],
        meta={"case_id": 0},
    )
    assert (fact.prompt, fact.subject, fact.target, fact.true_target) == (
        "The mother tongue of {} is", "Danielle Darrieux", "English", None)
    assert fact.paraphrases == ("Danielle Darrieux speaks",)
    assert fact.neighbors == (("Michel Rocard is a native speaker of", "French"),)
    assert fact.text == "The mother tongue of Danielle Darrieux is"
    with pytest.raises(TypeError):
        fact.meta["case_id"] = 1  # type: ignore[index]
    assert hash(fact) == hash(Fact(**DANIELLE, paraphrases=("Danielle Darrieux speaks",),
                                   neighbors=(("Michel Rocard is a native speaker of", "French"),)))


def test_filled_prompt_is_turned_into_a_template_at_the_first_occurrence() -> None:
    fact = Fact(prompt="Paris is the capital of France, and Paris is in", subject="Paris", target="Europe")
    assert fact.prompt == "{} is the capital of France, and Paris is in"
    assert fact.text == "Paris is the capital of France, and Paris is in"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(DANIELLE, subject="Michel Rocard", prompt="The mother tongue of X is"),
         "fact 'f1': subject 'Michel Rocard' does not occur in prompt 'The mother tongue of X is'"),
        (dict(DANIELLE, target="  "), "fact 'f1': target is empty"),
        (dict(DANIELLE, subject=""), "fact 'f1': subject is empty"),
        (dict(DANIELLE, prompt="{} and {} speak"), "exactly one '{}', found 2"),
        (dict(DANIELLE, prompt="The {0} tongue of {} is"), "braces besides"),
        (dict(DANIELLE, paraphrases="Danielle Darrieux speaks"), "paraphrases must be a sequence of strings"),
        (dict(DANIELLE, neighbors=[("only a prompt",)]), "neighbors[0] must be a (prompt, answer) pair"),
        (dict(DANIELLE, neighbors=[("Michel Rocard speaks", "")]), "neighbors[0] answer is empty"),
        (dict(DANIELLE, target=3), "target must be a string, got int"),
    ],
)
def test_invalid_facts_are_rejected_with_the_fact_named(kwargs: dict, message: str) -> None:
    with pytest.raises(FactError, match="^fact 'f1': ") as info:
        Fact(**kwargs, id="f1")
    assert message in str(info.value)


def test_error_names_the_prompt_when_there_is_no_id() -> None:
    with pytest.raises(FactError, match=r"^fact 'The mother tongue of \{\} is': target is empty"):
        Fact(**dict(DANIELLE, target=""))


def test_slot_ignores_case_whitespace_and_trailing_punctuation() -> None:
    a = Fact(prompt="What is the twin city of {}?", subject="Lyon", target="Manila")
    b = Fact(prompt="what is  the Twin city of {} ", subject=" LYON", target="Beirut")
    assert a.slot == b.slot == ("lyon", "what is the twin city of {}")
    assert a.slot != Fact(prompt="What is the twin city of {}?", subject="Lyons", target="X").slot
    assert a.slot != Fact(prompt="What is the sister city of {}?", subject="Lyon", target="X").slot


def test_dict_round_trip_is_json_safe_and_pickles() -> None:
    fact = Fact(**DANIELLE, true_target="French", paraphrases=("p1",), neighbors=(("n1", "a1"),),
                generation_prompts=("g1",), id="cf-0", meta={"case_id": 0, "source": "test"})
    data = json.loads(json.dumps(fact.to_dict()))
    assert Fact.from_dict(data) == fact
    assert pickle.loads(pickle.dumps(fact)) == fact
    assert fact.with_id("x").id == "x" and fact.with_id("x").with_id("cf-0") == fact
    assert Fact.from_dict(DANIELLE) == Fact(**DANIELLE)
    with pytest.raises(FactError, match=r"unknown keys \['target_new'\]"):
        Fact.from_dict({**DANIELLE, "target_new": "x"})
    with pytest.raises(FactError, match=r"missing keys \['target'\]"):
        Fact.from_dict({"prompt": "{} is", "subject": "s"})


# ------------------------------------------------------------------------- loaders, real data


@pytest.fixture(scope="module")
def counterfact() -> list[Fact]:
    return load_facts(counterfact_path())


def test_counterfact_knowedit_layout(counterfact: list[Fact]) -> None:
    assert len(counterfact) == 20_000
    first = counterfact[0]
    assert first == Fact(
        prompt="The mother tongue of {} is", subject="Danielle Darrieux", target="English",
        true_target="French", paraphrases=("Where Danielle Darrieux is from, people speak the language of",),
        neighbors=(("Michel Rocard is a native speaker of", "French"),), id="cf-0",
        meta={"source": "counterfact-knowedit", "record": 1, "case_id": 0},
    )
    assert all(len(f.paraphrases) == 1 and len(f.neighbors) == 1 for f in counterfact)
    assert len({f.id for f in counterfact}) == 20_000


def test_counterfact_splits(counterfact: list[Fact]) -> None:
    splits = json.loads((counterfact_path().parent / "easyedit_splits.json").read_text())
    train = load_facts(counterfact_path(), split="train")
    edit = load_facts(counterfact_path(), split="edit")
    # No train or edit case was held out: both splits are complete.
    assert len(train) == len(edit) == 10_000
    assert {f.meta["case_id"] for f in train} == set(splits["train"])
    assert {f.id for f in train} | {f.id for f in edit} == {f.id for f in counterfact}
    assert load_facts(counterfact_path(), split="train", limit=5) == train[:5]
    with pytest.raises(FactError, match="split 'val' not in"):
        load_facts(counterfact_path(), split="val")


def test_counterfact_rome_layout() -> None:
    facts = load_facts(counterfact_path("rome"))
    assert len(facts) == 1_115
    assert all(len(f.paraphrases) == 2 and len(f.neighbors) == 10 and len(f.generation_prompts) == 10
               for f in facts)
    assert all(answer == f.true_target for f in facts for _, answer in f.neighbors)
    first = facts[0]
    assert (first.id, first.prompt, first.subject, first.target, first.true_target) == (
        "cf-34", "{} was employed in", "Laurent Cars", "Philadelphia", "Paris")
    assert first.meta["relation_id"] == "P937"
    # easyedit_splits.json is found one folder up from rome_format/.
    train, edit = (load_facts(counterfact_path("rome"), split=s) for s in ("train", "edit"))
    assert (len(train), len(edit)) == (48, 1_067)


def test_counterfact_layouts_agree_on_shared_cases(counterfact: list[Fact]) -> None:
    by_id = {f.id: f for f in counterfact}
    for rome in load_facts(counterfact_path("rome"), limit=50):
        flat = by_id[rome.id]
        assert (flat.prompt, flat.subject, flat.target, flat.true_target) == (
            rome.prompt, rome.subject, rome.target, rome.true_target)


def test_zsre_mend_layout_and_target_conventions() -> None:
    facts = load_facts(zsre_path("mend-train"))
    assert len(facts) == 1_000  # every record is usable with answers[0] as the target
    first = facts[0]
    assert (first.prompt, first.subject, first.target, first.true_target) == (
        "What is the product made by {}?", "UniFirst", "uniform", "unmanned aircraft")
    assert first.paraphrases == ("What will be the product of UniFirst?",)
    assert first.neighbors == (("nq question: john goodman's character in the big lebowski?", "Walter Sobchak"),)
    assert first.id is None and first.meta == {"source": "zsre-mend", "record": 1}

    # EasyEdit's convention: two records have an empty alt, so they cannot be edits.
    with pytest.raises(FactError, match=r"zsre_mend_train_1k\.jsonl line 535: fact .*: target is empty"):
        load_facts(zsre_path("mend-train"), zsre_target="alt")
    alt = load_facts(zsre_path("mend-train"), zsre_target="alt", on_error="skip")
    assert len(alt) == 998
    assert {f.meta["record"] for f in facts} - {f.meta["record"] for f in alt} == {535, 724}
    assert (alt[0].target, alt[0].true_target) == ("unmanned aircraft", "uniform")
    assert len(load_facts(zsre_path("mend-eval"))) == 847


def test_zsre_knowedit_layout() -> None:
    facts = load_facts(zsre_path("knowedit"))
    assert len(facts) == 1_001
    assert all(len(f.paraphrases) == 1 and len(f.neighbors) == 2 for f in facts)
    first = facts[0]
    assert (first.prompt, first.target, first.true_target) == (
        "Which family does {} belong to?", "Noctuidae", "Aspidoceratidae")
    assert first.neighbors == (("The taxon rank of Epaspidoceras is", "genus"), ("Epaspidoceras taxon rank", "genus"))


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        (lambda: counterfact_path(), "counterfact-knowedit"),
        (lambda: counterfact_path("rome"), "counterfact-rome"),
        (lambda: zsre_path("mend-train"), "zsre-mend"),
        (lambda: zsre_path("knowedit"), "zsre-knowedit"),
    ],
)
def test_auto_detection_matches_the_explicit_format(path, fmt: str) -> None:
    assert load_facts(path(), limit=20) == load_facts(path(), format=fmt, limit=20)
    assert load_facts(path(), limit=20)[0].meta["source"] == fmt


# ------------------------------------------------------------------------ loaders, synthetic


def test_unknown_layout_names_the_keys_seen(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(FactError, match=r"x\.jsonl line 1: unknown fact layout, keys seen: \['answer', 'question'\]"):
        load_facts(path)
    with pytest.raises(FactError, match="unknown format 'csv'"):
        load_facts(path, format="csv")


def test_bad_records_are_named_by_line_and_can_be_skipped(tmp_path: Path) -> None:
    good = {"subject": "UniFirst", "src": "What does UniFirst make?", "answers": ["uniforms"], "alt": "drones",
            "rephrase": "UniFirst makes what?", "loc": "nq question: who", "loc_ans": "me"}
    path = write_jsonl(tmp_path / "z.jsonl", [
        good,
        "",  # blank lines are passed over but still counted
        {**good, "subject": "Acme"},
        {**good, "answers": []},
        {k: v for k, v in good.items() if k != "loc"},
        good,
    ])
    with pytest.raises(FactError, match=r"z\.jsonl line 3: fact 'What does UniFirst make\?': subject 'Acme' does not"):
        load_facts(path)
    facts = load_facts(path, on_error="skip")
    assert [f.meta["record"] for f in facts] == [1, 6]
    with pytest.raises(FactError, match=r"z\.jsonl line 4: field 'answers' is empty"):
        load_facts(write_jsonl(tmp_path / "z.jsonl", [good, good, good, {**good, "answers": []}]))
    with pytest.raises(FactError, match=r"^record 2: missing field 'loc'"):
        load_facts([good, {k: v for k, v in good.items() if k != "loc"}], format="zsre-mend")
    with pytest.raises(FactError, match=r"line 2: invalid JSON"):
        load_facts(write_jsonl(tmp_path / "broken.jsonl", [good, "{not json"]), on_error="skip")


def test_nested_field_errors_name_the_path() -> None:
    record = {"case_id": 7, "requested_rewrite": {"prompt": "{} is", "subject": "s", "target_new": {"id": "Q1"},
                                                  "target_true": {"str": "t"}}}
    with pytest.raises(FactError, match=r"^record 1: missing field 'requested_rewrite\.target_new\.str'"):
        load_facts([record])


def test_split_needs_a_splits_file(tmp_path: Path) -> None:
    records = [{"case_id": i, "prompt": f"{i} lives in", "subject": str(i), "target_new": "Rome",
                "ground_truth": "Paris"} for i in range(4)]
    path = write_jsonl(tmp_path / "cf.jsonl", records)
    with pytest.raises(FactError, match="needs easyedit_splits.json"):
        load_facts(path, split="edit")
    splits = tmp_path / "my_splits.json"
    splits.write_text(json.dumps({"edit": [1, 3], "train": [0, 2]}))
    assert [f.id for f in load_facts(path, split="edit", splits_file=splits)] == ["cf-1", "cf-3"]
    assert [f.id for f in load_facts(records, split="train", splits_file=splits)] == ["cf-0", "cf-2"]
    with pytest.raises(FactError, match="CounterFact only"):
        load_facts(zsre_path("mend-train"), split="edit", splits_file=splits)


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    facts = load_facts(counterfact_path("rome"), limit=30) + load_facts(zsre_path("knowedit"), limit=30)
    facts.append(Fact(prompt="{} est né à", subject="Émile Zola", target="Paris\u2028",
                      meta={"note": "unicode and U+2028 survive"}))
    path = tmp_path / "facts.jsonl"
    path.write_text("old content\n")
    assert dump_facts(facts, path) == path
    assert load_facts(path) == facts
    assert load_facts(path, format="plain", limit=3) == facts[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["facts.jsonl"]  # no temp file left behind

    as_array = tmp_path / "facts.json"
    as_array.write_text(json.dumps([f.to_dict() for f in facts], ensure_ascii=False), encoding="utf-8")
    assert load_facts(as_array) == facts
    dump_facts([], path)
    assert load_facts(path) == []


# ------------------------------------------------------------------------------------ paths


def test_shared_data_dir_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = shared_data_dir()
    assert (root / "README.md").is_file()
    assert counterfact_path() == root / "counterfact" / "counterfact.jsonl"
    for path in (counterfact_path("rome"), zsre_path("mend-eval"), wikitext_path("valid"), wikitext_path("test")):
        assert path.is_file()
    with pytest.raises(ValueError, match="unknown zsre file 'dev'"):
        zsre_path("dev")  # type: ignore[arg-type]

    monkeypatch.setenv("SEQEDIT_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("SEQEDIT_DATA", str(tmp_path / "missing"))
    with pytest.raises(SeqEditError, match="is not a directory"):
        shared_data_dir()


def test_formats_constant_lists_every_parser() -> None:
    assert set(FORMATS) == {"counterfact-rome", "counterfact-knowedit", "zsre-mend", "zsre-knowedit", "plain"}
