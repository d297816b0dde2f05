"""The chat prompt format on tiny models: the question rule, chat rows (subject located in the rendered
template), keys of chat rows against a direct computation, ``both`` as the average of the two formats,
the editor threading the format to keys and values, and the ledger recording it and refusing to mix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ledger_helpers import committed_ledger, make_editor

from seqedit import Editor, Fact, LedgerError
from seqedit.errors import LocateError
from seqedit.ledger import Ledger
from seqedit.locate.chat import answer_ids, chat_prompt, encode_chat, formats, question_template
from seqedit.locate.frozen import frozen_targets
from seqedit.locate.keys import ContextRows, read_keys
from seqedit.locate.templates import context_templates
from seqedit.pipeline import column_targets
from seqedit.testing import tiny_model, tiny_tokenizer

TEMPLATES = ["{}", "The weather was fine. {}", "Because of it. {}"]
FACTS = [
    Fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    Fact("What sport does {} play?", "Michael Jordan", "soccer", "basketball"),
]


def test_question_rule() -> None:
    assert question_template("The mother tongue of {} is") == "The mother tongue of {} is what?"
    assert question_template("{} plays in the position of.  ") == "{} plays in the position of what?"
    assert question_template("Which city is {} the capital of?") == "Which city is {} the capital of?"
    assert formats("both") == ("bare", "chat") and formats("chat") == ("chat",)
    with pytest.raises(LocateError, match="prompt_format must be one of"):
        formats("chatty")


def test_chat_row_locates_the_subject_in_the_rendered_template() -> None:
    tok = tiny_tokenizer()
    enc = encode_chat(tok, "Prefix. {}", "The mother tongue of {} is", "Danielle Darrieux")
    assert enc.text == tok.apply_chat_template(
        [{"role": "user", "content": "Prefix. The mother tongue of Danielle Darrieux is what?"}],
        tokenize=False, add_generation_prompt=True)
    assert enc.text.endswith("<|im_start|>assistant\n")
    end = enc.text.index("Darrieux") + len("Darrieux")
    off = tok(enc.text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    assert off[enc.subject_last][0] <= end - 1 < off[enc.subject_last][1] <= end
    assert list(enc.ids) == tok(enc.text, add_special_tokens=False)["input_ids"]
    # the answer starts the assistant's turn: no leading space, unlike a bare completion
    assert answer_ids(tok, "chat", "English") == tuple(tok("English", add_special_tokens=False)["input_ids"])
    assert answer_ids(tok, "bare", "English") == tuple(tok(" English", add_special_tokens=False)["input_ids"])


def test_chat_rows_need_a_template_that_keeps_the_message() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(LocateError, match="needs a chat template"):
        chat_prompt(tok, "Hello?")
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(LocateError, match="verbatim"):
        encode_chat(tok, "{}", "{} is", "Rome")


def test_chat_keys_equal_a_direct_computation_and_both_averages() -> None:
    lm = tiny_model("qwen2")
    tok = lm.tokenizer
    chat = read_keys(lm, ContextRows.build(tok, FACTS, TEMPLATES, "chat"), [1, 2], z_layer=2, batch_rows=2)
    grabbed = []
    h = lm.adapter.ffn_out(2).register_forward_pre_hook(lambda m, a: grabbed.append(a[0][0]))
    try:
        manual = torch.zeros(64, len(FACTS), dtype=torch.float64)
        z = torch.zeros(32, len(FACTS), dtype=torch.float64)
        for f, fact in enumerate(FACTS):
            for t, w in zip(TEMPLATES, (0.5, 0.25, 0.25)):
                user = t.replace("{}", question_template(fact.prompt)).replace("{}", fact.subject)
                text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
                enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
                end = text.index(fact.subject) + len(fact.subject)
                last = max(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= end - 1 < b)
                grabbed.clear()
                with torch.no_grad():
                    out = lm.model(input_ids=torch.tensor([enc["input_ids"]]), output_hidden_states=True)
                manual[:, f] += w * grabbed[0][last].double()
                if t == "{}":  # the primary row: the z-layer block output is hidden state 3
                    z[:, f] = out.hidden_states[3][0, last].double()
    finally:
        h.remove()
    torch.testing.assert_close(chat.keys[2], manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chat.z_hidden, z, rtol=1e-5, atol=1e-5)
    bare = read_keys(lm, ContextRows.build(tok, FACTS, TEMPLATES, "bare"), [1, 2], z_layer=2)
    both = read_keys(lm, ContextRows.build(tok, FACTS, TEMPLATES, "both"), [1, 2], z_layer=2)
    for layer in (1, 2):
        torch.testing.assert_close(both.keys[layer], (bare.keys[layer] + chat.keys[layer]) / 2)
    torch.testing.assert_close(both.z_hidden, bare.z_hidden)  # the primary row of `both` is the bare one


@pytest.mark.parametrize("prompt_format", ["chat", "both"])
def test_editor_reads_keys_in_its_prompt_format(tmp_path: Path, prompt_format: str) -> None:
    fresh = tiny_model("llama")
    ed = make_editor(tmp_path / "L", prompt_format=prompt_format)
    report = ed.apply(FACTS)
    templates = context_templates(fresh, ed.hparams.n_context_templates, ed.hparams.context_template_len,
                                  ed.hparams.template_seed)
    # layer 1 is read before anything is written: its keys are those of the unedited model
    # with one format, format_columns is settled off (and left out of the ledger, as before it existed)
    assert ed.hparams.format_columns is (prompt_format == "both")
    assert ("format_columns" in ed.ledger.manifest["hparams"]) is (prompt_format == "both")
    rows = ContextRows.build(fresh.tokenizer, report.facts, templates, prompt_format, split=ed.hparams.format_columns)
    want = read_keys(fresh, rows, [1]).keys[1]
    torch.testing.assert_close(report.constraints[1][0], want)
    other = read_keys(fresh, ContextRows.build(fresh.tokenizer, report.facts, templates, "bare"), [1]).keys[1]
    assert report.constraints[1][0].shape != other.shape or not torch.allclose(report.constraints[1][0], other)
    assert ed.ledger.manifest["prompt_format"] == prompt_format
    assert ed.ledger.step(1).info["prompt_format"] == prompt_format
    ed.close()


def test_ledger_refuses_to_mix_prompt_formats_unless_asked(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L", prompt_format="chat")
    ed.apply(FACTS[:1])
    ed.close()
    with pytest.raises(LedgerError, match="prompt format 'chat'; refusing to mix in 'bare'"):
        make_editor(tmp_path / "L", prompt_format="bare")
    ed = make_editor(tmp_path / "L")  # the ledger's format by default
    assert ed.prompt_format == "chat"
    ed.close()
    ed = make_editor(tmp_path / "L", prompt_format="both", mix_prompt_formats=True)
    ed.apply(FACTS[1:])
    ed.close()
    with Ledger(tmp_path / "L") as L:
        assert [s.info["prompt_format"] for s in L.steps()] == ["chat", "both"]
        assert L.manifest["prompt_format"] == "chat"


def test_chat_format_without_a_chat_template_is_refused_before_any_work() -> None:
    lm = tiny_model("llama")
    lm.tokenizer.chat_template = None
    with pytest.raises(LocateError, match="needs a chat template"):
        Editor(lm, layers=(1, 2), prompt_format="both")
    with pytest.raises(LocateError, match="prompt_format must be one of"):
        Editor(lm, layers=(1, 2), prompt_format="Chat")


def test_a_chat_ledger_on_a_tokenizer_without_template_is_refused_and_released(tmp_path: Path) -> None:
    committed_ledger(tmp_path / "L", prompt_format="chat")
    lm = tiny_model("llama")
    lm.tokenizer.chat_template = None
    with pytest.raises(LocateError, match="needs a chat template") as refused:
        make_editor(tmp_path / "L", lm=lm)
    # while the refusal (and the half-built editor in its traceback) is alive, the ledger is free
    make_editor(tmp_path / "L").close()
    assert refused.value is not None


def test_split_rows_give_each_format_its_own_key_column() -> None:
    lm = tiny_model("qwen2")
    tok = lm.tokenizer
    bare = read_keys(lm, ContextRows.build(tok, FACTS, TEMPLATES, "bare"), [1, 2], z_layer=2)
    chat = read_keys(lm, ContextRows.build(tok, FACTS, TEMPLATES, "chat"), [1, 2], z_layer=2)
    ctx = ContextRows.build(tok, FACTS, TEMPLATES, "both", split=True)
    assert ctx.columns == 2 and ctx.primary_rows() == [0, len(TEMPLATES)]
    split = read_keys(lm, ctx, [1, 2], z_layer=2, batch_rows=3)
    for layer in (1, 2):  # fact-major: fact f's bare column is 2f, its chat column 2f + 1
        assert split.keys[layer].shape == (64, 2 * len(FACTS))
        torch.testing.assert_close(split.keys[layer][:, 0::2], bare.keys[layer])
        torch.testing.assert_close(split.keys[layer][:, 1::2], chat.keys[layer])
    torch.testing.assert_close(split.z_hidden[:, 0::2], bare.z_hidden)
    torch.testing.assert_close(split.z_hidden[:, 1::2], chat.z_hidden)
    # one format has one column, split or not
    assert ContextRows.build(tok, FACTS, TEMPLATES, "chat", split=True).columns == 1


def test_column_targets_add_the_facts_delta_in_each_columns_context() -> None:
    z = torch.tensor([[1.0, 10.0], [2.0, 20.0]], dtype=torch.float64)  # [d=2, n=2]
    H = torch.tensor([[0.5, 3.0, 9.0, -1.0], [1.0, 4.0, 18.0, 0.0]], dtype=torch.float64)  # [2, n·2]
    # fact 0: δ = z₀ − H[:, 0] = (0.5, 1); fact 1: δ = (1, 2)
    want = torch.tensor([[1.0, 3.5, 10.0, 0.0], [2.0, 5.0, 20.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(column_targets(z, H, 2), want)
    assert column_targets(z, H[:, :2], 1) is z


def test_format_columns_edit_two_columns_per_fact_and_the_ledger_keeps_them(tmp_path: Path) -> None:
    fresh = tiny_model("llama")
    ed = make_editor(tmp_path / "L", prompt_format="both")  # columns are the default with both
    assert ed.hparams.format_columns and ed.ledger.manifest["hparams"]["format_columns"] is True
    report = ed.apply(FACTS)
    templates = context_templates(fresh, ed.hparams.n_context_templates, ed.hparams.context_template_len,
                                  ed.hparams.template_seed)
    want = read_keys(fresh, ContextRows.build(fresh.tokenizer, report.facts, templates, "both", split=True), [1]).keys[1]
    K1, V1 = report.constraints[1]
    assert K1.shape[1] == V1.shape[1] == 2 * len(FACTS)
    torch.testing.assert_close(K1, want.to(K1.dtype))
    assert ed.ledger.step(1).info["kv_width"] == 2
    rows = ed.ledger.in_force()
    stored = ed.ledger.kv(rows[1:], [1])[1]  # the second fact alone: its two columns
    torch.testing.assert_close(stored[0], K1[:, 2:4].double())
    torch.testing.assert_close(stored[1], V1[:, 2:4].double())
    assert ed.verify().ok
    fit = ed.constraint_fit()
    assert fit.n_facts == 2 and fit.layers[1]["columns"] == 4 and fit.layers[1]["by_step"][0]["facts"] == 2
    after = {l: ed.master[l].clone() for l in (1, 2)}
    ed.forget([report.facts[0].id])
    assert ed.verify().ok
    ed.undo(ed.ledger.last_step)
    assert ed.verify().ok
    for l in (1, 2):
        torch.testing.assert_close(ed.master[l], after[l], rtol=0, atol=1e-10)
    ed.close()
    reopened = make_editor(tmp_path / "L", prompt_format="both")
    reopened.prepare()
    for l in (1, 2):
        torch.testing.assert_close(reopened.master[l], after[l], rtol=0, atol=1e-10)
    reopened.close()


def test_a_both_ledger_written_before_columns_continues_with_averaged_keys(tmp_path: Path) -> None:
    ed = make_editor(tmp_path / "L", prompt_format="both", format_columns=False)
    ed.apply(FACTS[:1])
    assert "format_columns" not in ed.ledger.manifest["hparams"]  # as every ledger written before the field
    ed.close()
    reopened = make_editor(tmp_path / "L")  # the ledger's hyperparameters, not today's default
    assert reopened.prompt_format == "both" and reopened.hparams.format_columns is False
    report = reopened.apply(FACTS[1:])
    assert report.constraints[1][0].shape[1] == len(FACTS) - 1 and reopened.ledger.step(2).info.get("kv_width", 1) == 1
    reopened.close()


def test_format_columns_meet_each_formats_target_where_one_averaged_key_cannot(tmp_path: Path) -> None:
    """Nearly unregularised (λ → 0) and with no context template but the prompt itself (a column's key is then read on its
    primary row), the edit meets every column's target ``h0_g + δ``; one key averaged over the two
    contexts leaves the chat rows short of theirs. The same frozen values serve both."""
    fresh = tiny_model("llama")
    probe = make_editor(tmp_path / "probe", lm=fresh, lam=1e-3, v_steps=5, n_context_templates=0)
    hp = probe.hparams
    probe.close()
    templates = context_templates(fresh, hp.n_context_templates, hp.context_template_len, hp.template_seed)
    values = frozen_targets(fresh, FACTS, templates, hp, cache=False, prompt_format="both")
    prim = ContextRows.build(fresh.tokenizer, FACTS, ["{}"], "both", split=True)
    H0 = read_keys(fresh, prim, [], z_layer=hp.z_layer).z_hidden
    Z = column_targets(values.z, H0, 2)
    left = {}
    for split in (False, True):
        ed = make_editor(tmp_path / f"L{split}", prompt_format="both", format_columns=split, lam=1e-3, v_steps=5,
                         n_context_templates=0)
        ed.run(FACTS, batch_size=len(FACTS), values=values)
        H = read_keys(ed.loaded, prim, [], z_layer=hp.z_layer).z_hidden
        left[split] = float((Z - H)[:, 1::2].norm() / (Z - H0)[:, 1::2].norm())  # the chat columns
        ed.close()
    assert left[True] < 1e-4 < 0.03 < left[False]  # float32 storage of (K, V) bounds the first
