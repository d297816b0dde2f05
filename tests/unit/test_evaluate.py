"""Metric layer: hand-checked values on a bigram "model" with known logits, batched vs unbatched on a
tiny transformer, and smoke checks of the real general-task files."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch
from torch import nn

from seqedit.evaluate.counterfact import counterfact_metrics
from seqedit.evaluate.drift import (
    DriftReference,
    drift_metrics,
    drift_reference,
    wikitext_windows,
)
from seqedit.evaluate.fluency import (
    CONSISTENCY_UNAVAILABLE,
    fluency_score,
    generate_texts,
    ngram_entropy,
    text_entropy_score,
    word_tokenize,
)
from seqedit.evaluate.general import (
    TASKS,
    GeneralExample,
    choose_options,
    load_general_task,
    matthews_corrcoef,
    weighted_f1,
)
from seqedit.evaluate.scoring import length_batches, score_targets
from seqedit.evaluate.zsre import ZsreReference, zsre_metrics, zsre_reference
from seqedit.facts import Fact
from seqedit.shared_data import shared_data_dir
from seqedit.testing import tiny_model, tiny_tokenizer

V = 1000  # tiny tokenizer vocabulary


class BigramLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next token depends on the current one only, so every
    probability is readable from ``table`` by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.config = SimpleNamespace(vocab_size=table.shape[1])

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, do_sample=False, **_):
        """Greedy ``generate``: a bigram's next token depends on the last one only, so padding is moot."""
        assert not do_sample
        out = input_ids
        for _ in range(max_new_tokens):
            out = torch.cat([out, self.table[out[:, -1]].argmax(-1, keepdim=True)], 1)
        return out


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def loaded_for(table: torch.Tensor, tok) -> SimpleNamespace:
    return SimpleNamespace(model=BigramLM(table), tokenizer=tok, adapter=None)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def mean_nll(table: torch.Tensor, tok, prompt: str, target: str) -> float:
    """Direct s(T) from the bigram table: mean of −log p(t_j | t_{j−1}) starting at the prompt's last id."""
    lsm = torch.log_softmax(table.double(), -1)
    chain = [ids(tok, prompt)[-1], *ids(tok, " " + target)]
    return float(-sum(lsm[a, b] for a, b in itertools.pairwise(chain)) / (len(chain) - 1))


# ------------------------------------------------------------------------------------ CounterFact

FACTS = [
    Fact("The capital of {} is", "France", "Rome", "Paris",
         paraphrases=("Where is France? Its capital is", "France has its capital in"),
         neighbors=(("The capital of Germany, near France, is", "Paris"), ("People in Lyon speak", "Paris"),
                    ("The capital of Italy is", "Paris")), id="a"),
    Fact("{} speaks", "Danielle", "English", "French", paraphrases=("Danielle's mother tongue is",),
         neighbors=(("Jean speaks", "French"),), id="b"),
    Fact("{} plays", "Jordan", "football", None, id="no-true"),
]


def test_counterfact_uniform_model_is_strict(tok):
    # Every target has the same score log V under a uniform model: strict comparisons all fail.
    res = counterfact_metrics(loaded_for(torch.zeros(V, V), tok), FACTS)
    assert res.n_skipped == 1 and len(res.records) == 2
    assert (res.efficacy, res.generalization, res.specificity) == (0.0, 0.0, 0.0)
    assert res.rewrite_gm_prob_new_minus_true == pytest.approx(0.0, abs=1e-12)
    assert res.summary()["n_records"] == 2


def test_counterfact_matches_hand_computation(tok):
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(1)) * 3
    res = counterfact_metrics(loaded_for(table, tok), FACTS, batch_rows=3)

    def s(p, t):
        return mean_nll(table, tok, p, t)

    for fact, rec in zip(FACTS[:2], res.records):
        new, true = fact.target, fact.true_target
        assert rec.efficacy == float(s(fact.text, new) < s(fact.text, true))
        assert rec.generalization == pytest.approx(np.mean([s(p, new) < s(p, true) for p in fact.paraphrases]))
        assert rec.specificity == pytest.approx(np.mean([s(p, a) < s(p, new) for p, a in fact.neighbors]))
        assert rec.rewrite_gm_prob_new_minus_true == pytest.approx(
            math.exp(-s(fact.text, new)) - math.exp(-s(fact.text, true)), rel=1e-4)
        assert rec.neighborhood_gm_prob_new_minus_answer == pytest.approx(
            np.mean([math.exp(-s(p, new)) - math.exp(-s(p, a)) for p, a in fact.neighbors]), rel=1e-4)
    assert res.efficacy == pytest.approx(np.mean([r.efficacy for r in res.records]))


def test_counterfact_designed_outcome(tok):
    # Boost p(first token of " Rome" | " is"): it wins after every prefix ending in " is" — the rewrite
    # prompt, the first of two paraphrases (→ 1/2) and the third neighbour (lost); elsewhere ties (strict → 0).
    table = torch.zeros(V, V)
    table[ids(tok, "The capital of France is")[-1], ids(tok, " Rome")[0]] = 8.0
    assert ids(tok, " is") == ids(tok, "The capital of France is")[-1:]
    rec = counterfact_metrics(loaded_for(table, tok), FACTS[:1]).records[0]
    assert (rec.efficacy, rec.generalization, rec.specificity) == (1.0, 0.5, 0.0)
    # " Rome" is 2 tokens: gm prob = exp(-(s1 + s2)/2) with s1 = log(999 + e^8) - 8, s2 = log 1000.
    s_rome = (math.log(999 + math.exp(8)) - 8 + math.log(1000)) / 2
    s_paris = (math.log(999 + math.exp(8)) + 2 * math.log(1000)) / 3
    assert rec.rewrite_gm_prob_new_minus_true == pytest.approx(math.exp(-s_rome) - math.exp(-s_paris), rel=1e-5)


def test_counterfact_batched_equals_unbatched_on_tiny_transformer():
    loaded = tiny_model("gpt2")
    batched = counterfact_metrics(loaded, FACTS, batch_rows=64)
    single = counterfact_metrics(loaded, FACTS, batch_rows=1)
    for a, b in zip(batched.records, single.records):
        assert a.efficacy == b.efficacy and a.specificity == b.specificity
        assert a.rewrite_gm_prob_new_minus_true == pytest.approx(b.rewrite_gm_prob_new_minus_true, abs=1e-6)
    direct = score_targets(loaded, [(FACTS[0].text, "Rome")], batch_rows=1)[0].mean_nll
    assert math.exp(-direct) - math.exp(-score_targets(loaded, [(FACTS[0].text, "Paris")])[0].mean_nll) == \
        pytest.approx(batched.records[0].rewrite_gm_prob_new_minus_true, abs=1e-6)


@given(st.lists(st.integers(1, 300), max_size=60), st.integers(1, 9), st.integers(1, 50))
def test_length_batches_cover_every_row_once_within_budget(lengths, batch_rows, tokens_per_row):
    batches = length_batches(lengths, batch_rows, tokens_per_row)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    widths = [max(lengths[i] for i in b) for b in batches]
    assert widths == sorted(widths, reverse=True)  # longest first
    for b in batches:
        assert len(b) <= batch_rows
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= batch_rows * tokens_per_row


def test_length_batches_pad_less_than_file_order():
    lengths = [500, 20, 20, 20, 500, 20, 20, 20]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in length_batches(lengths, 4, 200))
    assert padded == 2 * 500 + 6 * 20 < 8 * 500
    with pytest.raises(ValueError):
        length_batches(lengths, 0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scores_keep_input_order_across_length_sorted_batches(family):
    # Prompts of very different lengths, shuffled: each score must equal that pair scored alone.
    loaded = tiny_model(family)
    if family == "gpt2":
        loaded = SimpleNamespace(model=loaded.model, tokenizer=loaded.tokenizer)  # no adapter: full-logits path
    pairs = [("The capital of France is", "Paris"), ("word " * 40 + "and so", "on and on"),
             ("A", "B"), ("Lorem ipsum " * 12, "dolor"), ("Rome is in", "Italy")]
    together = score_targets(loaded, pairs, batch_rows=2)
    alone = [score_targets(loaded, [p], batch_rows=1)[0] for p in pairs]
    for a, b in zip(together, alone):
        assert a.mean_nll == pytest.approx(b.mean_nll, abs=1e-5) and a.exact == b.exact
    assert len({round(s.mean_nll, 3) for s in together}) > 1


def test_shared_rows_by_hand():
    from seqedit.evaluate.scoring import shared_rows

    rows = [[1, 2, 3, 9], [1, 2, 3, 7, 8], [1, 2, 3, 7, 5], [4, 2, 3, 9], [1, 2, 3, 9]]
    spans = [(3, (9,)), (3, (7, 8)), (3, (7, 5)), (3, (9,)), (3, (9,))]
    hosts, host_of = shared_rows(rows, spans)
    # rows 1 and 2 both need [1, 2, 3, 7]: one host; rows 0 and 4 need only the prompt: served by it too;
    # row 3 has another prompt
    assert sorted(map(tuple, hosts)) == [(1, 2, 3, 7), (4, 2, 3)]
    assert host_of[0] == host_of[1] == host_of[2] == host_of[4] != host_of[3]
    # a row never serves one with a different prompt, even when its tokens would fit
    hosts, _ = shared_rows([[1, 2, 3], [1, 2, 3, 4]], [(3, (3,)), (2, (3, 4))])
    assert len(hosts) == 2
    with pytest.raises(ValueError, match="non-empty prompt"):
        shared_rows([[5]], [(0, (5,))])


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_rows_served_by_another_row_score_as_if_run_alone(family):
    # new/true targets of one and several tokens after the same prompts (CounterFact's layout)
    from seqedit.evaluate.scoring import target_rows

    loaded = tiny_model(family)
    if family == "gpt2":
        loaded = SimpleNamespace(model=loaded.model, tokenizer=loaded.tokenizer)  # no adapter: full-logits path
    prompts = ["The mother tongue of Danielle Darrieux is", "Rome is the capital of", "A"]
    targets = ["French", "English", "Italy", "the Roman Empire", "the Roman Republic", "B"]
    pairs = [(p, t) for p in prompts for t in targets]
    seen = []
    hook = loaded.model.base_model.register_forward_hook(
        lambda m, a, kw, out: seen.append((kw.get("input_ids") if a == () else a[0]).shape[0]), with_kwargs=True)
    try:
        together = score_targets(loaded, pairs, batch_rows=64)
    finally:
        hook.remove()
    alone = [score_targets(loaded, [p], batch_rows=1)[0] for p in pairs]
    for a, b in zip(together, alone):
        assert a.mean_nll == pytest.approx(b.mean_nll, abs=1e-5) and a.exact == b.exact
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    rows, spans = target_rows(loaded, pairs)
    distinct = {tuple(r[: s + len(t) - 1]) for r, (s, t) in zip(rows, spans) if len(t) > 1}
    assert sum(seen) < len(pairs) and sum(seen) <= len(distinct) + len(prompts)


# ------------------------------------------------------------------------------------------- ZsRE


def chain_table(tok, links: list[tuple[int, int]]) -> torch.Tensor:
    table = torch.zeros(V, V)
    for a, b in links:
        table[a, b] = 5.0
    return table


def test_zsre_token_accuracy_by_hand(tok):
    prompt, para = "The capital of France is", "France has its capital in"
    y = ids(tok, " Paris")  # 3 tokens
    nq = ("nq question: who wrote hamlet?", "Shakespeare")
    z = ids(tok, " Shakespeare")
    fact = Fact(prompt, "France", "Paris", paraphrases=(para,), neighbors=(nq,), id="z")
    # Edit prompt: tokens 1 and 2 right, token 3 wrong (row y[1] prefers y[0]) → 2/3.
    # Paraphrase: its last token prefers nothing special (uniform → argmax id 0 ≠ y[0]); tokens 2 and 3
    # follow the same rows as above → 1/3.
    links = [(ids(tok, prompt)[-1], y[0]), (y[0], y[1]), (y[1], y[0])]
    pre = chain_table(tok, links + [(ids(tok, nq[0])[-1], z[0])])
    loaded = loaded_for(pre, tok)
    ref = zsre_reference(loaded, [fact])
    assert ref.predictions[0][0][0] == z[0]
    assert ZsreReference.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    res = zsre_metrics(loaded, [fact], ref)
    assert res.efficacy == pytest.approx(2 / 3)
    assert y[0] != 0 and res.generalization == pytest.approx(1 / 3)
    assert res.specificity_vs_pre_edit == 1.0
    gold_hits = 1 + sum(int(torch.argmax(pre[a]) == b) for a, b in itertools.pairwise(z))
    assert res.specificity_vs_gold == pytest.approx(gold_hits / len(z))
    # "Edit": the neighbour's first prediction changes → pre-edit agreement loses exactly one token.
    post = pre.clone()
    post[ids(tok, nq[0])[-1], z[0]] = 0.0
    post[ids(tok, nq[0])[-1], 7] = 5.0
    res2 = zsre_metrics(loaded_for(post, tok), [fact], ref)
    assert res2.specificity_vs_pre_edit == pytest.approx((len(z) - 1) / len(z))
    assert res2.specificity_vs_gold == pytest.approx((gold_hits - 1) / len(z))
    assert zsre_metrics(loaded, [fact]).specificity_vs_pre_edit is None
    with pytest.raises(ValueError):
        zsre_metrics(loaded, [Fact(prompt, "France", "Paris")], ref)  # no neighbours: not ref's facts


def test_zsre_batched_equals_unbatched_on_tiny_transformer():
    loaded = tiny_model("llama")
    facts = [Fact("The capital of {} is", s, t, paraphrases=(f"{s} has its capital in",),
                  neighbors=(("nq question: who wrote hamlet?", "William Shakespeare"),)) for s, t in
             [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")]]
    ref = zsre_reference(loaded, facts)
    a = zsre_metrics(loaded, facts, ref, batch_rows=64)
    b = zsre_metrics(loaded, facts, ref, batch_rows=1)
    assert a == b and a.specificity_vs_pre_edit == 1.0



def test_scoring_passes_report_progress_over_every_row():
    from seqedit.evaluate.measure import References, edit_summary
    from seqedit.progress import Phase

    for dataset, family in (("counterfact", "gpt2"), ("zsre", "llama")):
        loaded = tiny_model(family)
        facts = FACTS if dataset == "counterfact" else [
            Fact("The capital of {} is", s, t, paraphrases=(f"{s} has its capital in",),
                 neighbors=(("nq question: who wrote hamlet?", "William Shakespeare"),))
            for s, t in [("France", "Paris"), ("Italy", "Rome")]]
        events = []
        quiet = edit_summary(loaded, dataset, facts, References(None, None), batch_rows=2)
        loud = edit_summary(loaded, dataset, facts, References(None, None), batch_rows=2, progress=events.append)
        assert loud["efficacy"] == quiet["efficacy"] and loud["generalization"] == quiet["generalization"]
        assert {e.phase for e in events} == {Phase.SCORING}
        start, *steps = events
        assert start.start and start.total > 0 and len(steps) > 1  # one advance per batch of 2 rows
        assert not any(e.start for e in steps) and sum(e.advance for e in steps) == start.total


# ---------------------------------------------------------------------------------------- general


def test_option_choice_by_likelihood(tok):
    prompt = "Is this sentence linguistically acceptable?\nSentence: x\nAnswer: "
    table = torch.zeros(V, V)
    # " No" is one token; boosting it after the (right-stripped) prompt's last token makes it win.
    table[ids(tok, prompt.rstrip())[-1], ids(tok, " No")[0]] = 5.0
    examples = [GeneralExample(prompt, ("No", "Yes"), 0), GeneralExample(prompt, ("Yes", "No"), 0)]
    assert choose_options(loaded_for(table, tok), examples) == [0, 1]
    # Uniform model: " No" (1 token) and " Yes" (2 tokens) both score log V; ties keep the first option.
    assert choose_options(loaded_for(torch.zeros(V, V), tok), examples) == [0, 0]


def test_weighted_f1_and_mcc_by_hand():
    t, p = [0, 0, 1, 1], [0, 1, 1, 1]
    assert weighted_f1(t, p) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert matthews_corrcoef(t, p) == pytest.approx(2 / math.sqrt(12))
    assert matthews_corrcoef([0, 1], [1, 1]) == 0.0  # undefined → 0
    assert weighted_f1([0, 1, 2], [0, 1, 2]) == 1.0 and matthews_corrcoef([0, 1, 2], [0, 1, 2]) == 1.0


def test_general_loader_reads_real_files():
    for task in TASKS:
        items = load_general_task(task)
        assert len(items) == 100
        with (shared_data_dir() / "general" / f"{task}.jsonl").open(encoding="utf-8") as f:
            raw = [json.loads(line) for line in f][10:110]
        text = raw[0].get("sentence") or raw[0].get("sentence1") or raw[0]["question"]
        assert text in items[0].prompt
        assert all(0 <= ex.label < len(ex.options) for ex in items)
    rte_raw = json.loads((shared_data_dir() / "general" / "rte.jsonl").read_text().splitlines()[10])
    glue = load_general_task("rte", 10, 11)[0]
    official = load_general_task("rte", 10, 11, official_rte_inversion=True)[0]
    assert glue.options[glue.label] == ("True" if rte_raw["label"] == 0 else "False")
    assert official.label == 1 - glue.label
    mmlu = load_general_task("mmlu", 10, 11)[0]
    assert mmlu.options == ("A", "B", "C", "D") and "\n(D) " in mmlu.prompt and mmlu.prompt.endswith("Answer:")


# ------------------------------------------------------------------------------------------ drift


def test_drift_uniform_perplexity_and_agreement(tok):
    loaded = loaded_for(torch.zeros(V, V), tok)
    ref = drift_reference(loaded, window=16, n_windows=3)
    assert ref.windows.shape == (3, 16) and ref.argmax.shape == (3, 15)
    assert ref.ppl == pytest.approx(V, rel=1e-5)
    res = drift_metrics(loaded, ref)
    assert res.agreement == 1.0 and res.n_tokens == 45 and res.ppl == pytest.approx(V, rel=1e-5)


def test_drift_by_hand_on_random_bigram(tok, tmp_path):
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(2))
    ref = drift_reference(loaded_for(table, tok), window=8, n_windows=4, batch_rows=3)
    windows = wikitext_windows(tok, 8, 4)
    assert (ref.windows == windows).all()
    assert ref.windows.reshape(-1).tolist() == ids(tok, (shared_data_dir() / "wikitext/wikitext-2-raw/wiki.test.raw")
                                                   .read_text()[:2000])[:32]
    edited = table.clone()
    edited[windows[0, 0]] = torch.randn(V, generator=torch.Generator().manual_seed(3))
    res = drift_metrics(loaded_for(edited, tok), DriftReference.load(ref.save(tmp_path / "ref.npz")))
    lsm = torch.log_softmax(edited.double(), -1)
    prev, nxt = windows[:, :-1].reshape(-1), windows[:, 1:].reshape(-1)
    nll = float(-lsm[prev, nxt].mean())
    agree = float((table[prev].argmax(-1) == edited[prev].argmax(-1)).double().mean())
    assert res.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert res.agreement == pytest.approx(agree) and agree < 1.0


# ---------------------------------------------------------------------------------------- fluency


def test_ngram_entropy_by_hand():
    assert word_tokenize("Hello, world! It's 3pm.") == ["Hello", ",", "world", "!", "It", "'", "s", "3pm", "."]
    toks = ["a", "b", "a", "b"]
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(toks, 2) == pytest.approx(h2)
    assert ngram_entropy(toks, 3) == pytest.approx(1.0)
    assert text_entropy_score("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert text_entropy_score("a") == 0.0
    assert fluency_score(["a b a b", "a"]) == pytest.approx(text_entropy_score("a b a b") / 2)
    assert "attribute_snippets" in CONSISTENCY_UNAVAILABLE


def test_generate_texts_length_and_seed(tok):
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(4))
    loaded = loaded_for(table, tok)
    prompts = ["The capital of France is", "Hello"]
    a = generate_texts(loaded, prompts, max_total_tokens=12, top_k=5, seed=0, batch_rows=1)
    assert a == generate_texts(loaded, prompts, max_total_tokens=12, top_k=5, seed=0, batch_rows=1)
    assert a != generate_texts(loaded, prompts, max_total_tokens=12, top_k=5, seed=1, batch_rows=1)
    assert all(t.startswith(p) for t, p in zip(a, prompts))
    assert all(len(ids(tok, t)) <= 12 + 2 for t in a)  # re-tokenising decoded text may merge differently
    # top_k=1 is greedy: each next token is the row argmax of the previous one.
    greedy = generate_texts(loaded, ["Hello", "The capital of France is"], max_total_tokens=9, top_k=1)
    chain = ids(tok, "Hello")
    while len(chain) < 9:
        chain.append(int(table[chain[-1]].argmax()))
    assert greedy[0] == tok.decode(chain)
