"""`seqedit serve` on the embedded SmolLM2-135M (integration): a fact submitted over HTTP is applied by
the worker and the OpenAI-shaped completion answers with the new target; forgetting it restores the
original greedy completion exactly."""

from __future__ import annotations

import pytest
from serve_helpers import auth, serve_client, wait_settled

import seqedit

pytestmark = pytest.mark.integration

PROMPT = "The mother tongue of Danielle Darrieux is"


def test_an_edit_over_http_changes_what_the_served_model_says(tmp_path):
    lm = seqedit.load_model("smollm2-135m", device_map="cpu")
    options = {"layers": None, "stats_tokens": None, "lam": None, "v_steps": None}  # the model's preset
    with serve_client(tmp_path, lm=lm, editor_options=options, model="smollm2-135m") as c:
        ask = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        before = c.post("/v1/completions", json=ask, headers=auth()).json()["choices"][0]["text"]
        r = c.post("/v1/edits", json={"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                      "target": "Swedish", "id": "dd"}, headers=auth())
        (edit,) = r.json()["edits"]
        assert wait_settled(c, [edit["id"]], timeout=900)[edit["id"]]["state"] == "applied"
        after = c.post("/v1/completions", json=ask, headers=auth()).json()["choices"][0]["text"]
        assert after.strip().startswith("Swedish"), (before, after)
        assert c.post("/v1/verify", headers=auth()).json()["ok"]
        assert c.delete("/v1/facts/dd", headers=auth()).status_code == 200
        assert c.post("/v1/completions", json=ask, headers=auth()).json()["choices"][0]["text"] == before
