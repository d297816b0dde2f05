"""`seqedit serve` on the embedded SmolLM2-135M-Instruct with a ``both`` ledger (integration): a fact
submitted over HTTP is the answer of ``/v1/chat/completions``, asked with the real ``openai`` client
through the model's own chat template; forgetting it restores the original chat answer exactly."""

from __future__ import annotations

import pytest
from serve_helpers import READ_TOKEN, auth, serve_client, wait_settled

import seqedit

pytestmark = pytest.mark.integration

QUESTION = "The mother tongue of Danielle Darrieux is what?"


def test_an_edit_on_a_both_ledger_is_the_chat_answer(tmp_path):
    openai = pytest.importorskip("openai")
    lm = seqedit.load_model("smollm2-135m", device_map="cpu")
    # the one-step preset's value budget, as tests/integration/test_chat_integration.py explains
    hp = seqedit.preset_for(lm.name, lm.adapter.n_layers, "one-step").override(stats_tokens=20_000)
    options = {"layers": None, "stats_tokens": None, "lam": None, "v_steps": None, "hparams": hp,
               "prompt_format": "both"}
    with serve_client(tmp_path, lm=lm, editor_options=options, model="smollm2-135m") as c:
        oa = openai.OpenAI(base_url="http://testserver/v1", api_key=READ_TOKEN, http_client=c)

        def ask() -> str:
            r = oa.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=12, temperature=0)
            assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
            return r.choices[0].message.content

        before = ask()
        assert "Swedish" not in before
        r = c.post("/v1/edits", json={"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                      "target": "Swedish", "id": "dd"}, headers=auth())
        (edit,) = r.json()["edits"]
        assert wait_settled(c, [edit["id"]], timeout=900)[edit["id"]]["state"] == "applied"
        after = ask()
        assert "Swedish" in after, (before, after)  # the reply names the new target
        streamed = oa.chat.completions.create(model="x", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=12, temperature=0, stream=True)
        assert "".join(p.choices[0].delta.content or "" for p in streamed if p.choices) == after
        assert c.delete("/v1/facts/dd", headers=auth()).status_code == 200
        assert ask() == before
