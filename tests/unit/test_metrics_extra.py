"""Metrics added for the evaluation suite: generation-scored general tasks, CounterFact fluency on the
ROME generation prompts, and the seeded record selection. Hand-checked on a bigram "model"."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from seqedit.errors import SeqEditError
from seqedit.evaluate.cf_fluency import counterfact_fluency, generation_prompts_for, rome_generation_prompts
from seqedit.evaluate.fluency import CONSISTENCY_UNAVAILABLE, generate_texts, text_entropy_score
from seqedit.evaluate.general import GeneralExample, load_general_task, task_result
from seqedit.evaluate.general_gen import general_metrics_generation, parse_answer
from seqedit.evaluate.scoring import greedy_completions
from seqedit.evaluate.selection import select_facts
from seqedit.datasets import load_facts
from seqedit.facts import Fact
from seqedit.shared_data import counterfact_path
from seqedit.testing import tiny_tokenizer
from test_evaluate import ids, loaded_for  # the bigram model with hand-readable logits

V = 1000  # tiny tokenizer vocabulary


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def bigram(table: torch.Tensor, tok) -> SimpleNamespace:
    return loaded_for(table, tok)


# ------------------------------------------------------------------------ generation-scored general


YES_NO = GeneralExample("p", ("No", "Yes"), 1)
TRUE_FALSE = GeneralExample("p", ("True", "False"), 0)
MMLU = GeneralExample("p", tuple("ABCD"), 2)


@pytest.mark.parametrize("example, text, want", [
    (YES_NO, " Yes, they are", 1),
    (YES_NO, " no.", 0),
    (YES_NO, " I do not know", -1),  # "no" inside "not"/"know" is not the word no
    (YES_NO, " yes or no", 1),  # the first option word wins
    (YES_NO, " no or yes", 0),
    (TRUE_FALSE, " False\n", 1),
    (TRUE_FALSE, " it is true", 0),
    (TRUE_FALSE, " maybe", -1),
    (MMLU, " C\n\nQuestion", 2),
    (MMLU, " (b) the", 1),
    (MMLU, " D.", 3),
    (MMLU, "", -1),
    (MMLU, " a cat", -1),  # an article, not an answer letter
    (MMLU, " Answer: C", -1),  # the letter must come first
])
def test_parse_answer(example, text, want):
    assert parse_answer(example, text) == want


def test_task_result_counts_unparseable_against_recall():
    res = task_result([0, -1, 1, 1], [0, 0, 1, 1])
    assert res.accuracy == 0.75 and res.n == 4
    # class 0: P=1, R=1/2 → F1 2/3; class 1: P=R=1 → 1; the −1 class has no support: weighted (2/3·2 + 1·2)/4
    assert res.f1 == pytest.approx((2 / 3 * 2 + 2) / 4)
    assert task_result([], []).n == 0 and task_result([], []).accuracy == 0.0


def test_greedy_completions_follow_the_argmax_chain(tok):
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(5))
    loaded = bigram(table, tok)
    prompts = ["The capital of France is", "Hello", "A much longer prompt than the others, to pad"]
    got = greedy_completions(loaded, prompts, max_new_tokens=4, batch_rows=2)
    for prompt, text in zip(prompts, got):
        chain = ids(tok, prompt)
        for _ in range(4):
            chain.append(int(table[chain[-1]].argmax()))
        assert text == tok.decode(chain[len(ids(tok, prompt)):])
    assert got == greedy_completions(loaded, prompts, max_new_tokens=4, batch_rows=64)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_completions(loaded, prompts, max_new_tokens=0)


def test_generation_scoring_by_hand(tok):
    # Every row's argmax is the first token of " True": every NLI/RTE answer parses to option 0 ("True").
    table = torch.zeros(V, V)
    table[:, ids(tok, " True")[0]] = 9.0
    follow = ids(tok, " True")
    for a, b in zip(follow, follow[1:]):
        table[a, b] = 10.0
    loaded = bigram(table, tok)
    res = general_metrics_generation(loaded, ("rte", "nli"), 10, 14, max_new_tokens=len(follow) + 1)
    for task, r in res.items():
        gold = [ex.label for ex in load_general_task(task, 10, 14)]
        assert r.predictions == (0,) * 4 and r.labels == tuple(gold)
        assert r.accuracy == pytest.approx(sum(g == 0 for g in gold) / 4)


# ---------------------------------------------------------------------------------------- fluency


def test_rome_generation_prompts_join_knowedit_facts(tok):
    table = rome_generation_prompts()
    assert len(table) > 1000 and all(len(v) >= 1 for v in list(table.values())[:20])
    case = next(iter(table))
    rome = load_facts(counterfact_path("rome"), limit=1)[0]
    assert rome.generation_prompts == table[rome.id]
    knowedit = Fact("The capital of {} is", "X", "Y", "Z", id=case)
    own = Fact("The capital of {} is", "X", "Y", "Z", generation_prompts=("X is a",), id="cf-nope")
    missing = Fact("The capital of {} is", "X", "Y", "Z", id="cf-999999999")
    assert generation_prompts_for([knowedit, own, missing]) == [table[case], ("X is a",), ()]


def test_counterfact_fluency_by_hand(tok):
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(6))
    loaded = bigram(table, tok)
    facts = [Fact("{} is", "A", "b", "c", generation_prompts=("A is", "A was"), id="f1"),
             Fact("{} is", "B", "b", "c", id="cf-999999999"),  # no prompts anywhere: skipped, counted
             Fact("{} is", "C", "b", "c", generation_prompts=("C is",), id="f3"),
             Fact("{} is", "D", "b", "c", generation_prompts=("D is",), id="f4")]
    out = counterfact_fluency(loaded, facts, max_records=2, seed=3, max_total_tokens=12, batch_rows=2)
    texts = generate_texts(loaded, ["A is", "A was", "C is"], 12, top_k=5, seed=3, batch_rows=2)
    want = ((text_entropy_score(texts[0]) + text_entropy_score(texts[1])) / 2 + text_entropy_score(texts[2])) / 2
    assert out["fluency"] == pytest.approx(want)
    assert (out["n_records"], out["n_texts"], out["n_without_prompts"]) == (2, 3, 1)
    assert out["consistency"] is None and out["consistency_note"] == CONSISTENCY_UNAVAILABLE
    assert counterfact_fluency(loaded, facts[1:2])["fluency"] is None


# -------------------------------------------------------------------------------------- selection


def test_selection_is_a_seeded_shuffle_not_the_first_n():
    a = select_facts("counterfact", 30, seed=1, split="edit")
    assert [f.id for f in a.facts] == [f.id for f in select_facts("counterfact", 30, seed=1, split="edit").facts]
    b = select_facts("counterfact", 30, seed=2, split="edit")
    assert [f.id for f in a.facts] != [f.id for f in b.facts]
    first = [f.id for f in load_facts(counterfact_path(), split="edit", limit=30)]
    assert [f.id for f in a.facts] != first
    assert len({f.id for f in a.facts}) == 30 and a.n_available == 10_000  # the edit split
    d = a.to_dict()
    assert d["seed"] == 1 and d["fact_ids"] == [f.id for f in a.facts] and "shuffle" in d["method"]
    # a longer selection with the same seed extends the shorter one's order
    assert [f.id for f in select_facts("counterfact", 40, seed=1, split="edit").facts][:30] == d["fact_ids"]


def test_zsre_selection_ids_and_conventions():
    sel = select_facts("zsre", 5, seed=0)
    assert all(f.id.startswith("zsre-") for f in sel.facts) and len({f.id for f in sel.facts}) == 5
    alt = select_facts("zsre", 5, seed=0, zsre_target="alt")
    for f, g in zip(sel.facts, alt.facts):
        assert (f.target, f.true_target) == (g.true_target, g.target)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset="wiki", n=3), "unknown dataset"),
    (dict(dataset="counterfact", n=0), "n must be"),
    (dict(dataset="counterfact", n=10_001, split="edit"), "fewer than n=10001"),
    (dict(dataset="zsre", n=3, split="edit"), "CounterFact only"),
    (dict(dataset="zsre", n=3, path="/no/such/file.jsonl"), "does not exist"),
])
def test_selection_errors(kwargs, match):
    with pytest.raises(SeqEditError, match=match):
        select_facts(seed=0, **kwargs)


def test_selection_needs_true_targets(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"prompt": "{} is", "subject": "A", "target": "b"}) + "\n")
    with pytest.raises(SeqEditError, match="true target"):
        select_facts("counterfact", 1, seed=0, path=str(path))
    assert select_facts("zsre", 1, seed=0, path=str(path)).facts[0].id == "zsre-1"


# ------------------------------------------------------------------- head-only scoring = full logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_head_at_target_positions_equals_full_logits(family):
    from seqedit.evaluate.scoring import score_targets
    from seqedit.evaluate.zsre import teacher_forced_argmax
    from seqedit.testing import tiny_model

    lm = tiny_model(family)
    full = SimpleNamespace(model=lm.model, tokenizer=lm.tokenizer, adapter=None)  # forces full logits
    pairs = [("The capital of France is", "Paris"), ("Hi", "a much longer target string here"), ("A", "b")]
    for a, b in zip(score_targets(lm, pairs, batch_rows=2), score_targets(full, pairs, batch_rows=3)):
        assert a.mean_nll == pytest.approx(b.mean_nll, abs=1e-5) and a.exact == b.exact
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert teacher_forced_argmax(lm, pairs, 2) == teacher_forced_argmax(full, pairs, 3)
    prompts = ["The capital of France is", "Hello there"]
    assert generate_texts(lm, prompts, 14, seed=2, batch_rows=2) == generate_texts(full, prompts, 14, seed=2, batch_rows=2)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama", "qwen3"])
def test_kv_cached_left_padded_sampling_equals_plain_greedy(family):
    """top_k=1 sampling with the KV cache and left padding = argmax chains of full, unpadded forwards."""
    from seqedit.testing import tiny_model

    lm = tiny_model(family)
    prompts = ["The capital of France is", "Hi", "A much longer prompt, so that the others are padded"]
    got = generate_texts(lm, prompts, max_total_tokens=16, top_k=1, batch_rows=3)
    for prompt, text in zip(prompts, got):
        chain = lm.tokenizer(prompt)["input_ids"]
        while len(chain) < 16:
            logits = lm.model(input_ids=torch.tensor([chain])).logits
            chain.append(int(logits[0, -1].argmax()))
        assert text == lm.tokenizer.decode(chain, skip_special_tokens=True)


def test_single_token_options_cost_one_prompt_forward_per_example():
    from seqedit.evaluate.general import choose_options
    from seqedit.evaluate.scoring import score_targets
    from seqedit.testing import tiny_model

    lm = tiny_model("llama")
    examples = [GeneralExample(f"Question {i}: pick one.\nAnswer:", tuple("ABCD"), 0) for i in range(3)]
    examples.append(GeneralExample("Is it good?\nAnswer:", ("No", "Yes, absolutely, without any doubt"), 0))
    seen = []
    hook = lm.model.base_model.register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"].shape[0]),
                                                     with_kwargs=True)
    try:
        got = choose_options(lm, examples, batch_rows=64)
    finally:
        hook.remove()
    # the three single-token examples read every option off their prompt's row; the other one reads
    # "No" off the long option's row (scoring.shared_rows): four rows, one forward
    assert seen == [4]
    for ex, k in zip(examples, got):
        nll = [s.mean_nll for s in score_targets(lm, [(ex.prompt, o) for o in ex.options])]
        assert k == min(range(len(nll)), key=lambda j: nll[j])


def test_cohort_means_by_hand() -> None:
    from types import SimpleNamespace as R

    from seqedit.evaluate.measure import cohort_means

    recs = [R(efficacy=1.0, generalization=None, specificity=0.5), R(efficacy=0.0, generalization=1.0, specificity=0.5),
            R(efficacy=1.0, generalization=None, specificity=0.0)]
    assert cohort_means(recs, 2) == [
        {"facts": [1, 2], "efficacy": 0.5, "generalization": 1.0, "specificity": 0.5},
        {"facts": [3, 3], "efficacy": 1.0, "generalization": None, "specificity": 0.0},
    ]
    assert cohort_means(recs, 5) == [{"facts": [1, 3], "efficacy": 2 / 3, "generalization": 1.0,
                                      "specificity": 1 / 3}]
    assert cohort_means([], 3) == []
    with pytest.raises(ValueError, match="positive"):
        cohort_means(recs, 0)
