"""Integration test on the embedded SmolLM2-135M-Instruct and its own chat template: subjects are
located inside the real rendering, and facts edited in the ``both`` format are its answers in chat."""

from __future__ import annotations

import pytest

import seqedit
from seqedit.evaluate.chat import chat_metrics
from seqedit.locate.chat import encode_chat, question_template
from seqedit.shared_data import counterfact_path

pytestmark = pytest.mark.integration


def test_both_format_edits_are_answered_through_the_real_chat_template() -> None:
    lm = seqedit.load_model("smollm2-135m")  # threads: tests/unit/conftest.py
    tok = lm.tokenizer
    facts = seqedit.load_facts(counterfact_path(), split="train", limit=2)
    for f in facts:
        enc = encode_chat(tok, "{}", f.prompt, f.subject)
        assert enc.text.startswith("<|im_start|>system\n") and enc.text.endswith("<|im_start|>assistant\n")
        # the located token is the subject's last one: decoding up to it ends with the subject
        assert tok.decode(list(enc.ids[: enc.subject_last + 1])).endswith(f.subject)
        question = question_template(f.prompt)
        assert tok.decode(list(enc.ids[enc.subject_last + 1 :])).startswith(question[question.index("{}") + 2 :])
    before = chat_metrics(lm, facts)
    # the one-step preset's larger value budget (0.75‖h₀‖): this tests that chat-format keys and values
    # reach the chat answer, not how much of it the long-run budget (0.4‖h₀‖) learns (1 of these 2)
    hp = seqedit.preset_for(lm.name, lm.adapter.n_layers, "one-step").override(stats_tokens=20_000)
    seqedit.Editor(lm, prompt_format="both", hparams=hp).apply(facts)
    after = chat_metrics(lm, facts)
    assert before.efficacy == 0.0 and after.efficacy == 1.0, (before.summary(), after.summary())
