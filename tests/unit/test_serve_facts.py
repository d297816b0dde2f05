"""Paging and search over the facts in force (``GET /v1/facts?q=``), as the page uses them, and the
page's script (its "try it" panel and the facts pager) parsed by node when node is installed."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from serve_helpers import READ_TOKEN, auth, fact, serve_client, wait_settled

from seqedit.serve.page import render_page


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with serve_client(tmp_path_factory.mktemp("facts"), max_batch=256) as c:
        body = {"facts": [fact(i, id=f"f{i}") for i in range(150)]}
        ids = [e["id"] for e in c.post("/v1/edits", json=body, headers=auth()).json()["edits"]]
        wait_settled(c, ids, timeout=120)
        yield c


def get(client, query: str) -> dict:
    r = client.get("/v1/facts" + query, headers=auth(READ_TOKEN))
    assert r.status_code == 200, r.text
    return r.json()


def test_search_matches_id_subject_target_and_text_in_any_case(client):
    hits = get(client, "?q=PLACE%2012")
    assert hits["total"] == 11 and {f["subject"] for f in hits["facts"]} == {"Place 12"} | {f"Place {i}" for i in range(120, 130)}
    assert [f["id"] for f in get(client, "?q=town%2099-0")["facts"]] == ["f99"]
    assert get(client, "?q=f149")["total"] == 1
    assert get(client, "?q=is%20located")["total"] == 150  # the filled prompt text
    assert get(client, "?q=nowhere")["total"] == 0
    assert client.get("/v1/facts?q=", headers=auth()).status_code == 422


def test_search_results_page_like_the_whole_list(client):
    whole = get(client, "?q=place%201&limit=1000")["facts"]  # Place 1, 10-19, 100-149
    assert len(whole) == 1 + 10 + 50
    pages = [get(client, f"?q=place%201&limit=25&offset={o}") for o in (0, 25, 50)]
    assert [f["id"] for p in pages for f in p["facts"]] == [f["id"] for f in whole]
    assert {p["total"] for p in pages} == {61} and len(pages[-1]["facts"]) == 11
    assert get(client, "?limit=50&offset=100")["facts"][0]["id"] == "f100"  # oldest first
    assert get(client, "/f7")["target"] == "Town 7-0"


def test_the_page_has_the_try_it_panel_and_the_pager():
    page = render_page("m")
    for element in ('id="try-form"', 'id="try-chat"', 'id="try-answer"', 'id="fact-search"', 'id="facts-prev"',
                    'id="facts-next"', 'id="facts-range"'):
        assert element in page
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the script's syntax is not checked")
    script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    run = subprocess.run(["node", "--check", "--input-type=module"], input=script, text=True, capture_output=True)
    assert run.returncode == 0, run.stderr


def test_the_page_script_pages_searches_and_asks(tmp_path):
    """The page's own script run by node on a minimal DOM (tests/unit/page_harness.js): the pager walks 120
    facts 50 at a time, the search box filters them, and "try it" asks bare or through chat."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    import json
    from pathlib import Path

    page = render_page("m")
    (tmp_path / "page.js").write_text(re.search(r"<script>(.*)</script>", page, re.S).group(1))
    facts = [{"id": f"f{i}", "prompt": "{} is in", "subject": f"Place {i}", "target": f"Town {i}", "step": 1}
             for i in range(120)]
    fixture = {"facts": facts, "GET /v1/log": {"last_step": 3, "steps": []},
               "GET /v1/edits": {"counts": {"queued": 0}, "edits": []},
               "POST /v1/completions": {"choices": [{"text": " Paris"}]},
               "POST /v1/chat/completions": {"choices": [{"message": {"role": "assistant", "content": "Rome"}}]}}
    (tmp_path / "fixture.json").write_text(json.dumps(fixture))
    harness = Path(__file__).with_name("page_harness.js")
    run = subprocess.run(["node", str(harness), str(tmp_path / "page.js"), str(tmp_path / "fixture.json")],
                         text=True, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["range0"] == "1–50 of 120" and out["rows0"] == 50 and out["prev0"] and not out["next0"]
    assert out["range1"] == "51–100 of 120" and out["first1"] == "f50"
    assert out["range2"] == "1–11 of 11 matching" and str(out["nfacts2"]) == "120"  # Place 7, 70..79; the header counts all
    assert out["bare"] == " Paris" and out["chat"] == "Rome"
    (bare, b), (chat, c) = [(p, body) for _, p, body in out["calls"]]
    assert bare == "/v1/completions" and b == {"max_tokens": 16, "temperature": 0, "prompt": "Place 7 is located in"}
    assert chat == "/v1/chat/completions" and c["messages"] == [{"role": "user", "content": "Place 7 is located in what?"}]
