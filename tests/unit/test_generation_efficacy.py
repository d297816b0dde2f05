"""Generation efficacy: the greedy continuation must begin with the target, at a word boundary."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, strategies as st

from seqedit.evaluate.generation_efficacy import begins_with_target, generation_efficacy, spread_sample
from seqedit.evaluate.scoring import greedy_completions
from seqedit.facts import Fact
from seqedit.testing import tiny_model


@pytest.mark.parametrize("continuation,target,hit", [
    (" English and French", "English", True),
    ("English", "English", True),
    ("  english,  spoken", "English", True),  # case and whitespace do not matter
    (" Englishman", "English", False),  # the target must end at a word boundary
    (" the English", "English", False),  # it must come first
    (" New   York City", "New York", True),
    (" C++ is", "C++", True),  # a target ending in punctuation needs no boundary after it
    ("", "English", False),
    (" anything", "   ", False),  # an empty target never counts
])
def test_begins_with_target(continuation: str, target: str, hit: bool) -> None:
    assert begins_with_target(continuation, target) is hit


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_spread_sample_is_even_and_covers_the_whole_range(n: int, limit: int) -> None:
    got = spread_sample(n, limit)
    assert got == sorted(set(got)) and all(0 <= i < n for i in got)
    assert len(got) == min(n, limit)
    if limit < n:  # evenly spaced from the first item to the last stretch: every editing cohort is represented
        lo, hi = n // limit, -(-n // limit)
        assert got[0] == 0 and n - got[-1] <= hi
        assert all(lo <= b - a <= hi for a, b in zip(got, got[1:]))


def test_spread_sample_bounds() -> None:
    assert spread_sample(7, None) == list(range(7))
    with pytest.raises(ValueError, match="limit must be >= 1"):
        spread_sample(7, 0)


def test_generation_efficacy_counts_what_the_model_says() -> None:
    """On a random tiny model, a target taken from the model's own greedy continuation is a hit and
    any other is not; paraphrases are scored the same way into generalization."""
    lm = tiny_model("llama", hidden=64, intermediate=128)
    prompts = ["The mother tongue of Danielle Darrieux is", "Michael Jordan plays the sport of",
               "Danielle Darrieux speaks"]
    full = greedy_completions(lm, prompts, max_new_tokens=6)
    said = [c.split()[0] for c in full]
    assert all(said), said
    own = Fact("The mother tongue of {} is", "Danielle Darrieux", said[0], "French",
               paraphrases=(prompts[2], prompts[1]))
    other = Fact("{} plays the sport of", "Michael Jordan", said[1] + "zzq", "basketball")
    got = generation_efficacy(lm, [own, other])
    assert got["n_records"] == 2
    assert [r.efficacy for r in got["records"]] == [1.0, 0.0]
    expect_para = (float(begins_with_target(full[2], said[0])) + float(begins_with_target(full[1], said[0]))) / 2
    assert got["records"][0].generalization == pytest.approx(expect_para)
    assert got["records"][1].generalization is None  # no paraphrases: not counted
    assert got["generation_efficacy"] == 0.5
    assert got["generation_generalization"] == pytest.approx(expect_para)
    first = generation_efficacy(lm, [own, other, dataclasses.replace(other, target="zzq")], limit=1)
    assert first["n_records"] == 1 and first["generation_efficacy"] == 1.0
