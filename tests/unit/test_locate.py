"""Locate: subject location, keys, and the batched / suffix-only value optimisation.

The value optimisation is checked against a direct re-implementation of the reference algorithm
(full sequences through the whole model, full-vocabulary logits, torch.optim.Adam, one fact at a
time), so the prefix cache, label-only logits and per-row Adam are all covered.
"""

from __future__ import annotations

import pytest
import torch

from seqedit.errors import LocateError
from seqedit.facts import Fact
from seqedit.locate.chat import formats, question_template
from seqedit.locate.keys import ContextRows, KeyReader, read_keys
from seqedit.locate.tokens import encode_prompt, fill_template, target_ids
from seqedit.locate.trace import block_hidden, replace_block_hidden
from seqedit.locate.values import KL_PROMPT, compute_values, delta_budget
from seqedit.models.presets import EditHParams
from seqedit.testing import tiny_model, tiny_tokenizer

TEMPLATES = ["{}", "The weather was fine. {}", "Because of it. {}"]
FACTS = [
    Fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    Fact("{} plays the sport of", "Michael Jordan", "soccer", "basketball"),
    Fact("The capital city of {}, as everyone knows, is", "Italy", "Paris", "Rome"),
]


def test_fill_template_and_subject_offsets() -> None:
    text, a, b = fill_template("Prefix. {}", "The mother tongue of {} is", "Danielle Darrieux")
    assert text == "Prefix. The mother tongue of Danielle Darrieux is"
    assert text[a:b] == "Danielle Darrieux"
    tok = tiny_tokenizer()
    enc = encode_prompt(tok, "Prefix. {}", "The mother tongue of {} is", "Danielle Darrieux")
    pieces = tok.convert_ids_to_tokens(list(enc.ids))
    # the located token ends the subject, and the next one starts after it
    off = tok(text, return_offsets_mapping=True)["offset_mapping"]
    assert off[enc.subject_last][0] <= b - 1 < off[enc.subject_last][1]
    assert off[enc.subject_last + 1][0] >= b - 1
    assert len(pieces) == len(enc.ids)


def test_subject_location_with_bos_tokenizer() -> None:
    tok = tiny_tokenizer(add_bos=True)
    plain = encode_prompt(tiny_tokenizer(), "{}", "{} is a", "Michael Jordan")
    with_bos = encode_prompt(tok, "{}", "{} is a", "Michael Jordan")
    assert with_bos.ids[0] == tok.bos_token_id
    assert with_bos.subject_last == plain.subject_last + 1


def test_target_ids_and_errors() -> None:
    tok = tiny_tokenizer()
    assert target_ids(tok, "English") == target_ids(tok, " English")
    with pytest.raises(LocateError, match="tokenises to nothing"):
        target_ids(tok, "   ")
    with pytest.raises(LocateError, match="one '\\{\\}'"):
        fill_template("{} and {}", "x {}", "s")


def test_keys_are_template_weighted_ffn_inputs() -> None:
    lm = tiny_model("llama")
    ctx = ContextRows.build(lm.tokenizer, FACTS, TEMPLATES)
    out = read_keys(lm, ctx, [1, 2], z_layer=3, batch_rows=4)  # several batches
    assert out.keys[1].shape == (64, 3) and out.z_hidden.shape == (32, 3)
    # manual: run each row alone, read the down_proj input at the subject's last token
    grabbed = []
    h = lm.adapter.ffn_out(2).register_forward_pre_hook(lambda m, a: grabbed.append(a[0][0]))
    manual = torch.zeros(64, 3, dtype=torch.float64)
    for f in range(3):
        for t, w in zip(range(3), (0.5, 0.25, 0.25)):
            row = ctx.rows[f * 3 + t]
            grabbed.clear()
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([row.ids]))
            manual[:, f] += w * grabbed[0][row.subject_last].double()
    h.remove()
    torch.testing.assert_close(out.keys[2], manual, rtol=1e-5, atol=1e-6)


def _reference_z(lm, fact: Fact, templates, hp: EditHParams, prompt_format: str = "bare") -> tuple[torch.Tensor, int]:
    """The reference compute_z: full rows, whole model, full vocabulary, torch Adam, one fact; the rows
    of every format of ``prompt_format`` (chat rows rendered directly with the chat template)."""
    tok, model, adapter = lm.tokenizer, lm.model, lm.adapter
    rows, subj, labels, tgts = [], [], [], []
    for fmt in formats(prompt_format):
        tgt = list(target_ids(tok, fact.target, lead_space=fmt == "bare"))
        for t in templates:
            if fmt == "bare":
                enc = encode_prompt(tok, t, fact.prompt, fact.subject)
                ids, last = list(enc.ids), enc.subject_last
            else:
                user = t.replace("{}", question_template(fact.prompt)).replace("{}", fact.subject)
                text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
                end = text.rindex(fact.subject) + len(fact.subject)  # the subject occurs once per row
                enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
                ids = enc["input_ids"]
                last = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= end - 1 < b)
            rows.append(ids + tgt)  # through the last target token: its output is the continuation position
            subj.append(last)
            labels.append(len(ids) - 1)
            tgts.append(tgt)
    n_rewrite = len(rows)
    enc = encode_prompt(tok, "{}", KL_PROMPT, fact.subject)
    rows.append(list(enc.ids))
    subj.append(enc.subject_last)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    d = adapter.dims(hp.z_layer)[0]
    delta = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    state = {}

    def hook(_m, _a, out):
        h = block_hidden(out)
        if "h0" not in state:
            state["h0"] = h[0, subj[0]].detach().clone()
        h = h.clone()
        for i, s in enumerate(subj):
            h[i, s] = h[i, s] + delta
        return replace_block_hidden(out, h)

    handle = adapter.block(hp.z_layer).register_forward_hook(hook)
    init = None
    cont_init = None
    updates = 0
    try:
        for it in range(hp.v_steps):
            opt.zero_grad()
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
            nll = torch.stack(
                [
                    -logp[i, [labels[i] + j for j in range(len(tgts[i]))], tgts[i]].mean()
                    for i in range(n_rewrite)
                ]
            ).mean()
            kl_lp = logp[n_rewrite, subj[-1]]
            if init is None:
                init = kl_lp.detach().clone()
            kl = (kl_lp.exp() * (kl_lp - init)).sum()
            firsts = [i for i in range(n_rewrite) if i % len(templates) == 0]  # each format's template-free row
            cont_lp = torch.stack([logp[i, labels[i] + len(tgts[i])] for i in firsts])
            if cont_init is None:
                cont_init = cont_lp.detach().clone()
            cont_kl = (cont_lp.exp() * (cont_lp - cont_init)).sum(-1).mean()
            loss = (nll + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() / state["h0"].norm() ** 2
                    + hp.continuation_kl * cont_kl)
            if loss.item() < hp.early_stop_loss or it == hp.v_steps - 1:
                break
            loss.backward()
            opt.step()
            updates += 1
            with torch.no_grad():
                max_norm = hp.clamp_norm_factor * len(formats(prompt_format)) ** 0.5 * state["h0"].norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
    return (state["h0"] + delta.detach()).double(), updates


@pytest.mark.parametrize("family,prompt_format,continuation_kl", [
    ("llama", "bare", 0.0), ("gpt2", "bare", 0.0), ("llama", "chat", 0.0), ("gpt2", "both", 0.0),
    ("llama", "bare", 50.0), ("qwen2", "both", 50.0)])
def test_values_match_reference_compute_z(family: str, prompt_format: str, continuation_kl: float) -> None:
    lm = tiny_model(family, hidden=64, intermediate=128)
    hp = EditHParams(layers=(1, 2), v_lr=0.5, v_steps=8, early_stop_loss=-1.0, v_batch_facts=8,
                     continuation_kl=continuation_kl)
    got = compute_values(lm, FACTS, TEMPLATES, hp, prompt_format=prompt_format)
    for f, fact in enumerate(FACTS):
        ref, updates = _reference_z(lm, fact, TEMPLATES, hp, prompt_format)
        assert got.steps[f] == updates == hp.v_steps - 1
        torch.testing.assert_close(got.z[:, f], ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("prompt_format,factor", [("bare", 1.0), ("chat", 1.0), ("both", 2 ** 0.5)])
def test_delta_budget_grows_with_the_square_root_of_the_formats(prompt_format: str, factor: float) -> None:
    # a budget small enough to bind for every fact: ‖δ‖ ends exactly on it
    lm = tiny_model("llama", hidden=64, intermediate=128)
    hp = EditHParams(layers=(1, 2), v_lr=0.5, v_steps=4, early_stop_loss=-1.0, clamp_norm_factor=0.01)
    assert delta_budget(hp, prompt_format) == pytest.approx(0.01 * factor)
    got = compute_values(lm, FACTS, TEMPLATES, hp, prompt_format=prompt_format)
    ratio = (got.z - got.h0).norm(dim=0) / got.h0.norm(dim=0)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.01 * factor), rtol=1e-4, atol=0)


def test_continuation_kl_keeps_what_follows_the_target() -> None:
    """With κ_c the distribution after the whole new target moves less from the unedited model's than
    without it (measured with the optimised δ injected, on the full rows), at a cost in target NLL."""
    lm = tiny_model("llama", hidden=64, intermediate=128)
    hp = EditHParams(layers=(1, 2), v_lr=2.0, v_steps=15, early_stop_loss=-1.0, clamp_norm_factor=8.0,
                     v_weight_decay=0.0, kl_factor=0.0)
    tok, adapter = lm.tokenizer, lm.adapter
    moved = {}
    for k in (0.0, 1000.0):
        got = compute_values(lm, FACTS, TEMPLATES, hp.override(continuation_kl=k))
        shift = []
        for f, fact in enumerate(FACTS):
            enc = encode_prompt(tok, "{}", fact.prompt, fact.subject)
            ids = torch.tensor([list(enc.ids) + list(target_ids(tok, fact.target))])
            delta = (got.z[:, f] - got.h0[:, f]).float()

            def inject(_m, _a, out, s=enc.subject_last, d=delta):
                h = block_hidden(out).clone()
                h[0, s] = h[0, s] + d
                return replace_block_hidden(out, h)

            with torch.no_grad():
                before = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1], -1)
                handle = adapter.block(hp.z_layer).register_forward_hook(inject)
                try:
                    after = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1], -1)
                finally:
                    handle.remove()
            shift.append(float((after.exp() * (after - before)).sum()))
        moved[k] = (sum(shift), sum(got.nll))
    assert moved[1000.0][0] < 0.5 * moved[0.0][0], moved
    assert moved[1000.0][1] > moved[0.0][1], moved
    with pytest.raises(ValueError, match="continuation_kl must be >= 0"):
        hp.override(continuation_kl=-1.0)


def test_batched_values_equal_per_fact_values_with_early_stopping() -> None:
    lm = tiny_model("qwen2", hidden=64, intermediate=128)
    # random tiny models barely move (NLL ≈ ln|V|); a threshold between the facts' losses makes
    # one fact stop early while the others run on
    hp = EditHParams(
        layers=(2,), v_lr=0.05, v_steps=12, early_stop_loss=6.93, v_batch_facts=8,
        clamp_norm_factor=4.0, v_weight_decay=0.0,
    )
    together = compute_values(lm, FACTS, TEMPLATES, hp)
    assert len(set(together.steps)) > 1, together.steps  # rows really froze at different times
    for f, fact in enumerate(FACTS):
        alone = compute_values(lm, [fact], TEMPLATES, hp)
        assert alone.steps[0] == together.steps[f]
        torch.testing.assert_close(together.z[:, f], alone.z[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.h0[:, f], alone.h0[:, 0], rtol=1e-5, atol=1e-6)


def test_value_optimisation_lowers_target_nll() -> None:
    lm = tiny_model("gptj", hidden=64, intermediate=128)
    hp = EditHParams(
        layers=(1, 2), v_lr=0.05, v_steps=15, early_stop_loss=-1.0, clamp_norm_factor=4.0, v_weight_decay=0.0
    )
    first = compute_values(lm, FACTS, TEMPLATES, hp.override(v_steps=1))
    last = compute_values(lm, FACTS, TEMPLATES, hp)
    assert all(b < a for a, b in zip(first.nll, last.nll)), (first.nll, last.nll)
    norms = (last.z - last.h0).norm(dim=0) / last.h0.norm(dim=0)
    assert bool((norms <= 4.0 + 1e-4).all())


def test_bfloat16_values_keep_h0_exact_and_track_float32() -> None:
    """bfloat16 upper blocks: h0 is the model's own float32 state, bitwise the float32 run's (what the
    solver subtracts), δ follows the float32 optimisation closely, and the model is left as it was."""
    lm = tiny_model("llama", hidden=64, intermediate=128)
    hp = EditHParams(layers=(1, 2), v_lr=0.05, v_steps=8, early_stop_loss=-1.0, clamp_norm_factor=4.0)
    full = compute_values(lm, FACTS, TEMPLATES, hp)
    half = compute_values(lm, FACTS, TEMPLATES, hp.override(v_compute_dtype="bfloat16"))
    H = read_keys(lm, ContextRows.build(lm.tokenizer, FACTS, ["{}"]), [], z_layer=2).z_hidden
    assert torch.equal(half.h0, full.h0)
    torch.testing.assert_close(full.h0, H, rtol=1e-5, atol=1e-5)
    d_full, d_half = full.z - full.h0, half.z - half.h0
    rel = ((d_half - d_full).norm(dim=0) / d_full.norm(dim=0)).max()
    assert rel < 0.1, rel  # bf16 has 8 mantissa bits; 7 Adam steps keep δ within a few percent
    assert half.steps == full.steps
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert all("forward" not in m.__dict__ for m in lm.model.modules())  # the weight copies are gone
    assert 0 < rel  # the upper blocks did run in bfloat16


def test_compute_dtype_is_validated_and_parsed() -> None:
    with pytest.raises(ValueError, match="v_compute_dtype"):
        EditHParams(layers=(1,), v_compute_dtype="int8")
    got = EditHParams.parse_assignments(["layers=3,4", "lam=2e3", "v_steps=9", "v_compute_dtype=bfloat16"])
    assert got == {"layers": (3, 4), "lam": 2000.0, "v_steps": 9, "v_compute_dtype": "bfloat16"}
    for bad, msg in (["nope=1"], "unknown hyperparameter"), (["v_steps=x"], "takes a int"), (["lam"], "NAME=VALUE"),\
                    (["format_columns=maybe"], "takes a bool"):
        with pytest.raises(ValueError, match=msg):
            EditHParams.parse_assignments(bad)
    assert EditHParams.parse_assignments(["format_columns=true"]) == {"format_columns": True}
    assert EditHParams.parse_assignments(["format_columns=0"]) == {"format_columns": False}
    with pytest.raises(ValueError, match="format_columns must be true or false"):
        EditHParams(layers=(1,), format_columns="yes")


def test_subject_not_in_tokens_raises() -> None:
    tok = tiny_tokenizer()
    with pytest.raises(LocateError, match="one '\\{\\}'"):
        encode_prompt(tok, "{}", "no slot here", "x")


def test_key_reader_replays_frozen_blocks_exactly() -> None:
    """Reads after editing a layer at/above ``frozen_below`` equal a fresh full forward."""
    lm = tiny_model("llama")
    ctx = ContextRows.build(lm.tokenizer, FACTS, TEMPLATES)
    reader = KeyReader(lm, ctx, batch_rows=4)
    first = reader.read([1], z_layer=3, frozen_below=1)
    torch.testing.assert_close(first.keys[1], read_keys(lm, ctx, [1]).keys[1], rtol=1e-6, atol=1e-7)
    lm.adapter.set_weight(1, lm.adapter.weight(1) * 1.5)  # edit the layer just read, as a step does
    second = reader.read([2], z_layer=3, frozen_below=2)
    fresh = read_keys(lm, ctx, [2], z_layer=3)
    torch.testing.assert_close(second.keys[2], fresh.keys[2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(second.z_hidden, fresh.z_hidden, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(first.z_hidden, second.z_hidden)  # the edit is seen
    lm.adapter.set_weight(2, lm.adapter.weight(2) * 0.5)
    third = reader.read([3], z_layer=3, frozen_below=3)
    fresh = read_keys(lm, ctx, [3], z_layer=3)
    torch.testing.assert_close(third.keys[3], fresh.keys[3], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(third.z_hidden, fresh.z_hidden, rtol=1e-6, atol=1e-7)


def test_a_field_added_later_reads_as_older_dicts_imply_and_round_trips() -> None:
    hp = EditHParams(layers=(1, 2))
    assert hp.format_columns is True  # the default since columns were measured better (docs/chat.md)
    assert hp.to_dict()["format_columns"] is True and EditHParams.from_dict(hp.to_dict()) == hp
    legacy = {k: v for k, v in hp.to_dict().items() if k != "format_columns"}  # as written before the field
    assert EditHParams.from_dict(legacy).format_columns is False  # those ledgers averaged their formats
    off = hp.override(format_columns=False)
    assert "format_columns" not in off.to_dict() and EditHParams.from_dict(off.to_dict()) == off


def test_one_prompt_format_settles_format_columns_so_older_settings_still_match() -> None:
    hp = EditHParams(layers=(1, 2))
    assert hp.for_formats(2) is hp
    one = hp.for_formats(1)
    assert one.format_columns is False and "format_columns" not in one.to_dict()
    assert one == hp.override(format_columns=False)
    with pytest.raises(ValueError, match="at least one prompt format"):
        hp.for_formats(0)
