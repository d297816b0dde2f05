"""Edit metrics through the chat template: the scores against a direct computation on a tiny model, the
metric arithmetic on hand-set scores and replies, the first-sentence answer check, EvalConfig's new
fields (older results folders stay resumable) and ``seqedit generate --chat``."""

from __future__ import annotations


import pytest
import torch

from seqedit import Fact
from seqedit.evaluate import chat as chat_eval
from seqedit.evaluate.chat import chat_metrics, chat_replies, chat_scores, first_sentence
from seqedit.evaluate.config import EvalConfig, EvalSettingsError
from seqedit.editor import Editor
from seqedit.testing import tiny_model
from test_cli import assert_clean_failure, facts_file, invoke, invoke_json, model_dir  # noqa: F401 (fixtures)


def test_chat_scores_equal_a_direct_computation() -> None:
    lm = tiny_model("llama")
    tok = lm.tokenizer
    pairs = [("Where is Rome what?", "Italy"), ("Who plays the sport of basketball?", "Michael Jordan")]
    got = chat_scores(lm, pairs, batch_rows=1)
    for (q, target), s in zip(pairs, got):
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        t = tok(target, add_special_tokens=False)["input_ids"]  # the answer starts the turn: no leading space
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([p + t])).logits[0].float(), -1)
        want = -torch.stack([logp[len(p) - 1 + j, y] for j, y in enumerate(t)]).mean()
        assert abs(s - float(want)) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "qwen2"])
def test_batched_greedy_replies_equal_one_at_a_time(family: str) -> None:
    """Left-padded, length-sorted batches give each row the reply it gets alone (the same tokens)."""
    from seqedit.evaluate.scoring import greedy_continuations

    lm = tiny_model(family)
    tok = lm.tokenizer
    texts = ["Hi", "Where is the Eiffel Tower located, and who built it?", "The capital of France is",
             "What?", "A much longer question about the mother tongue of Danielle Darrieux and her films?"]
    rows = [tok(t)["input_ids"] for t in texts]
    alone = []
    for r in rows:
        ids = torch.tensor([r])
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=12, pad_token_id=tok.pad_token_id)
        alone.append(tok.decode(out[0, len(r):], skip_special_tokens=True))
    assert greedy_continuations(lm, rows, 12, batch_rows=3) == alone
    assert greedy_continuations(lm, rows[::-1], 12, batch_rows=5) == alone[::-1]  # input order kept
    with pytest.raises(ValueError, match="empty"):
        greedy_continuations(lm, [rows[0], []], 4)


def test_first_sentence() -> None:
    assert first_sentence("  English. It is spoken in Paris.") == "English."
    assert first_sentence("Dr. Who?\nNo") == "Dr."  # a plain rule: the first '. ' ends the sentence
    assert first_sentence("Her mother tongue is English\nand French") == "Her mother tongue is English"
    assert first_sentence("") == ""


def test_chat_metrics_on_hand_set_scores(monkeypatch) -> None:
    facts = [
        Fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French",
             paraphrases=("Danielle Darrieux speaks",), neighbors=(("Michel Rocard speaks", "French"),), id="a"),
        Fact("What sport does {} play?", "Michael Jordan", "soccer", "basketball",
             neighbors=(("What sport does Kobe Bryant play?", "basketball"),), id="b"),
        Fact("{} is located in", "Rome", "Spain", id="c"),  # no true target: only asked
    ]
    nll = {  # (question, target) -> s; lower is likelier
        ("The mother tongue of Danielle Darrieux is what?", "English"): 1.0,
        ("The mother tongue of Danielle Darrieux is what?", "French"): 2.0,  # efficacy 1
        ("Danielle Darrieux speaks what?", "English"): 3.0,
        ("Danielle Darrieux speaks what?", "French"): 2.5,  # generalization 0
        ("Michel Rocard speaks what?", "English"): 4.0,
        ("Michel Rocard speaks what?", "French"): 1.0,  # specificity 1
        ("What sport does Michael Jordan play?", "soccer"): 2.0,
        ("What sport does Michael Jordan play?", "basketball"): 2.0,  # a tie is no win: efficacy 0
        ("What sport does Kobe Bryant play?", "soccer"): 1.0,
        ("What sport does Kobe Bryant play?", "basketball"): 5.0,  # specificity 0
        ("Rome is located in what?", "Spain"): 0.5,
    }
    asked = []
    monkeypatch.setattr(chat_eval, "chat_scores", lambda lm, pairs, batch_rows: [nll[p] for p in pairs])
    monkeypatch.setattr(chat_eval, "chat_replies",
                        lambda lm, qs, n: asked.extend(qs) or ["It is english. Not French.", "Basketball!", "Spain"])
    res = chat_metrics(None, facts)
    assert asked == ["The mother tongue of Danielle Darrieux is what?", "What sport does Michael Jordan play?",
                     "Rome is located in what?"]
    a, b, c = res.records
    assert (a.efficacy, a.generalization, a.specificity, a.answer_new, a.answer_true) == (1.0, 0.0, 1.0, 1.0, 0.0)
    assert (b.efficacy, b.generalization, b.specificity, b.answer_new, b.answer_true) == (0.0, None, 0.0, 0.0, 1.0)
    assert (c.efficacy, c.generalization, c.specificity, c.answer_new, c.answer_true) == (None, None, None, 1.0, None)
    summary = res.summary()
    assert summary == {"efficacy": 0.5, "generalization": 0.0, "specificity": 0.5, "answer_new": 2 / 3,
                       "answer_true": 0.5, "n_records": 3}


def test_chat_replies_are_greedy_continuations_of_the_rendered_question() -> None:
    lm = tiny_model("gpt2")
    tok = lm.tokenizer
    (reply,) = chat_replies(lm, ["Who are you?"], max_new_tokens=5)
    text = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert reply == tok.decode(ids[-5:], skip_special_tokens=True)


def test_eval_config_prompt_format_fields() -> None:
    old = EvalConfig().settings()
    assert "prompt_format" not in old and "chat_eval" not in old  # older folders' settings still match
    cfg = EvalConfig(prompt_format="both")
    assert cfg.settings()["prompt_format"] == "both" and cfg.chat_metrics
    assert EvalConfig(chat_eval=True).chat_metrics and not EvalConfig().chat_metrics
    with pytest.raises(EvalSettingsError, match="prompt_format must be one of"):
        EvalConfig(prompt_format="chatml").validate()


def test_cli_edit_in_chat_format_refuses_mixing_and_generate_chat(model_dir, facts_file, tmp_path) -> None:  # noqa: F811
    ledger = tmp_path / "L"
    data = invoke_json("edit", facts_file, "--model", model_dir, "--layers", "1,2", "--n", "2", "--lam", "10",
                       "--ledger", ledger, "--prompt-format", "chat", "--chat", "-p", "What is Rome?")
    assert data["prompt_format"] == "chat" and list(data["completions"]) == ["What is Rome?"]
    bad = invoke("edit", facts_file, "--model", model_dir, "--ledger", ledger, "--prompt-format", "bare", "--n", "1")
    assert_clean_failure(bad, "refusing to mix in 'bare'", "--mix-prompt-formats")
    assert_clean_failure(invoke("edit", facts_file, "--model", model_dir, "--prompt-format", "Chat"), "prompt_format")
    chat = invoke_json("generate", "What is Rome?", "--ledger", ledger, "--chat", "--max-new-tokens", "3")
    with Editor.from_ledger(ledger) as ed:
        assert ed.prompt_format == "chat"
        assert chat["chat"] is True and chat["completions"] == {"What is Rome?": chat_replies(ed.loaded, ["What is Rome?"], 3)[0]}
    tok_dir = tmp_path / "plain"
    lm = tiny_model("llama")
    lm.tokenizer.chat_template = None
    lm.model.save_pretrained(tok_dir)
    lm.tokenizer.save_pretrained(tok_dir)
    assert_clean_failure(invoke("generate", "--chat", "--model", tok_dir, "What is Rome?"), "needs a chat template")


def test_eval_run_edits_in_its_prompt_format_and_scores_in_chat(tmp_path) -> None:
    from seqedit.evaluate.results import weights_sha
    from seqedit.evaluate.runner import run_eval
    from seqedit.evaluate.selection import select_facts
    from seqedit.models.presets import preset_for

    overrides = dict(layers=(1, 2), stats_tokens=2000, v_steps=3, lam=10.0)
    cfg = EvalConfig(model="tiny-llama", n=2, batch_size=2, methods=("memit",), alignments=("aligned",), modes=("se",),
                     general_n=0, drift_windows=0, fluency_n=0, retention_every=0, general_every=0, layout="rome",
                     overrides=dict(overrides), eval_batch_rows=16, values="current", prompt_format="both")
    lm = tiny_model("llama")
    data = run_eval(cfg, tmp_path, loaded=lm)
    assert data["settings"]["prompt_format"] == "both"
    base, final = data["baseline"]["edit"]["chat"], data["configs"]["memit/aligned/se"]["final"]["edit"]["chat"]
    assert base["n_records"] == final["n_records"] == 2
    from seqedit.report import markdown

    md = markdown(data)
    assert "editing prompt format **both**" in md and "| Chat Eff. | Chat Gen. | Chat Spe. | Chat Ans. |" in md
    assert f"| pre-edit | – | {100 * base['efficacy']:.1f} |" in md
    # the same edit by hand: one step of an editor in the `both` format, then the chat metrics
    sel = select_facts("counterfact", 2, cfg.seed, layout="rome", split="edit")
    hp = preset_for(lm.name, lm.adapter.n_layers).override(**overrides)
    for fmt in ("bare", "both"):
        base_w = {l: lm.adapter.weight(l).detach().clone() for l in hp.layers}
        Editor(lm, hparams=hp, prompt_format=fmt).apply(sel.facts)
        sha = weights_sha({l: lm.adapter.weight(l) for l in hp.layers})
        # the run edited in the `both` format: its weights are those of a `both` editor, not a bare one
        assert (sha == data["configs"]["memit/aligned/se"]["final_weights_sha256"]) == (fmt == "both")
        if fmt == "both":
            assert {k: v for k, v in final.items() if k != "seconds"} == chat_metrics(lm, sel.facts, 16).summary()
        for l, w in base_w.items():
            lm.adapter.set_weight(l, w)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "qwen2"])
def test_scores_with_a_shared_head_equal_full_rows(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chat rows share their template's head; running it once (KV cache) changes no score."""
    from seqedit.evaluate import scoring

    lm = tiny_model(family)
    head = "System: you are a helpful assistant who answers in one short sentence.\nUser: "
    pairs = [(head + q, t) for q, t in [("Where is Rome?", "Italy"), ("Who wrote Hamlet, the play?", "Shakespeare"),
                                        ("What?", "No"), ("The mother tongue of Danielle Darrieux is", "French")]]
    rows, _ = scoring.target_rows(lm, pairs)
    assert scoring.shared_head(rows, 10**6) >= 8  # the path under test is taken
    fast = scoring.score_targets(lm, pairs, batch_rows=3)
    monkeypatch.setattr(scoring, "shared_head", lambda rows, limit, min_len=8: 0)
    full = scoring.score_targets(lm, pairs, batch_rows=3)
    for a, b in zip(fast, full):
        assert a.mean_nll == pytest.approx(b.mean_nll, abs=1e-5) and a.exact == b.exact


def test_shared_head_length() -> None:
    from seqedit.evaluate.scoring import shared_head

    rows = [list(range(20)), list(range(12)) + [99, 98], list(range(15))]
    assert shared_head(rows, 100) == 12
    assert shared_head(rows, 10) == 10  # capped: the first scored position must stay in the tail
    assert shared_head(rows, 100, min_len=13) == 0
    assert shared_head([[1, 2, 3]], 2, min_len=1) == 2
