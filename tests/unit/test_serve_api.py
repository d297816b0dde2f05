"""The HTTP API on a tiny random llama, in process with httpx (FastAPI's TestClient): the durable queue
and its batching worker, facts, forget/undo/log/verify/export, OpenAI-shaped completions, the weights
lock, restart and reconciliation, auth and JSON errors."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from serve_helpers import READ_TOKEN, auth, fact, make_config, serve_client, wait_ready, wait_settled

from seqedit.serve import ServeConfig, ServeConfigError, TokenTable, create_app, read_token_file
from seqedit.serve.edit_queue import EditQueue
from seqedit.testing import tiny_model


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with serve_client(tmp_path_factory.mktemp("serve")) as c:
        yield c


def submit(client: TestClient, body, **headers) -> list[str]:
    r = client.post("/v1/edits", json=body, headers={**auth(), **headers})
    assert r.status_code == 202, r.text
    return [e["id"] for e in r.json()["edits"]]


def test_facts_are_queued_then_applied_one_step_per_batch(client):
    ids = submit(client, fact(1)) + submit(client, {"facts": [fact(2), fact(3, id="place-3")]})
    states = wait_settled(client, ids)
    assert {s["state"] for s in states.values()} == {"applied"}
    assert states[ids[2]]["fact_id"] == "place-3"
    assert states[ids[0]]["fact_id"] == ids[0]  # no id given: the edit id names the fact
    facts = client.get("/v1/facts", headers=auth(READ_TOKEN)).json()
    assert {ids[0], ids[1], "place-3"} <= {f["id"] for f in facts["facts"]}
    one = client.get("/v1/facts/place-3", headers=auth(READ_TOKEN)).json()
    assert one["subject"] == "Place 3" and one["step"] == states[ids[2]]["step"]
    assert client.get("/v1/edits/nope", headers=auth()).status_code == 404
    assert client.get("/v1/facts/nope", headers=auth()).status_code == 404


def test_a_refused_fact_is_rejected_with_its_reason_and_never_blocks_the_others(client):
    wait_settled(client, submit(client, fact(10, id="taken")))
    client.app.state.config.max_wait_s = 0.5  # let both land in one batch
    try:
        ids = submit(client, {"facts": [fact(11, id="taken"), fact(12), fact(13)]})
    finally:
        client.app.state.config.max_wait_s = 0.05
    states = wait_settled(client, ids)
    assert states[ids[0]]["state"] == "rejected"
    assert "already in force for another slot" in states[ids[0]]["reason"]
    assert [states[i]["state"] for i in ids[1:]] == ["applied", "applied"]


def test_two_corrections_of_one_slot_both_apply_in_order(client):
    client.app.state.config.max_wait_s = 0.5
    try:
        first, second = submit(client, fact(20, 1)), submit(client, fact(20, 2))
    finally:
        client.app.state.config.max_wait_s = 0.05
    states = wait_settled(client, first + second)
    assert states[first[0]]["step"] < states[second[0]]["step"]  # the later one waited for the next step
    facts = client.get("/v1/facts?limit=1000", headers=auth()).json()["facts"]
    assert [f["target"] for f in facts if f["subject"] == "Place 20"] == ["Town 20-2"]


def test_invalid_facts_are_refused_on_submit(client):
    r = client.post("/v1/edits", json=fact(30, prompt="no subject here"), headers=auth())
    assert r.status_code == 422 and "does not occur in prompt" in r.json()["error"]["message"]
    r = client.post("/v1/edits", json={"facts": [fact(31), fact(31, 1)]}, headers=auth())
    assert r.status_code == 422 and "same subject and relation" in r.json()["error"]["message"]
    r = client.post("/v1/edits", json=fact(32, meta={"serve_edit": "x"}), headers=auth())
    assert r.status_code == 422
    deep = {"x": [[[[[[[[[[1]]]]]]]]]]}
    r = client.post("/v1/edits", json=fact(33, meta=deep), headers=auth())
    assert r.status_code == 422 and "nested deeper" in r.json()["error"]["message"]
    r = client.post("/v1/edits", json={"facts": []}, headers=auth())
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_idempotency_key_returns_the_first_submission(client):
    a = submit(client, fact(40), **{"Idempotency-Key": "k-40"})
    b = submit(client, fact(40), **{"Idempotency-Key": "k-40"})
    assert a == b
    r = client.post("/v1/edits", json=fact(41), headers={**auth(), "Idempotency-Key": "k-40"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    wait_settled(client, a)


def test_forget_undo_log_verify(client):
    wait_settled(client, submit(client, fact(50, id="gone")))
    step = client.delete("/v1/facts/gone", headers=auth()).json()
    assert step["kind"] == "forget" and step["removed"] == ["gone"]
    assert client.get("/v1/facts/gone", headers=auth()).status_code == 404
    assert client.delete("/v1/facts/gone", headers=auth()).status_code == 404
    undo = client.post(f"/v1/steps/{step['id']}/undo", headers=auth()).json()
    assert undo["kind"] == "undo" and undo["target"] == step["id"] and undo["added"] == ["gone"]
    again = client.post(f"/v1/steps/{step['id']}/undo", headers=auth())
    assert again.status_code == 409 and "already undone" in again.json()["error"]["message"]
    assert client.post("/v1/steps/99999/undo", headers=auth()).status_code == 404
    log = client.get("/v1/log?limit=2", headers=auth(READ_TOKEN)).json()
    assert [s["id"] for s in log["steps"]] == [undo["id"], step["id"]] and log["last_step"] == undo["id"]
    refused = client.post("/v1/verify", json={"tol": 1e-8}, headers=auth(READ_TOKEN))  # verify holds the worker
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    rep = client.post("/v1/verify", json={"tol": 1e-8}, headers=auth()).json()
    assert rep["ok"] and rep["n_facts"] == client.get("/v1/facts", headers=auth()).json()["total"]


def test_export_stays_inside_the_export_root(client, tmp_path):
    root = client.app.state.config.export_root
    r = client.post("/v1/export", json={"path": "d1", "delta": True}, headers=auth())
    assert r.status_code == 200 and r.json()["path"] == "d1" and (root / "d1" / "delta.safetensors").is_file()
    r = client.post("/v1/export", json={"path": "models/full"}, headers=auth())
    assert r.status_code == 200 and (root / "models" / "full" / "config.json").is_file()
    assert r.json()["step"] == client.get("/v1/log", headers=auth()).json()["last_step"]
    for bad in ("../escape", "/tmp/abs", "a/../../escape", "."):
        r = client.post("/v1/export", json={"path": bad}, headers=auth())
        assert r.status_code == 400, (bad, r.text)
    (root / "link").symlink_to(tmp_path)
    assert client.post("/v1/export", json={"path": "link/x"}, headers=auth()).status_code == 400
    assert client.post("/v1/export", json={"path": "d1"}, headers=auth()).status_code == 409
    assert client.post("/v1/export", json={"path": "d2"}, headers=auth(READ_TOKEN)).status_code == 403


def test_completions_have_the_openai_shape(client):
    body = {"model": "whatever", "prompt": ["Place 1 is located in", ""], "max_tokens": 5, "temperature": 0, "n": 2}
    r = client.post("/v1/completions", json=body, headers=auth(READ_TOKEN))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["choices"][0]["text"] == out["choices"][1]["text"]  # greedy: n copies agree
    assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"])
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= 20
    text = out["choices"][0]["text"]
    if len(text) > 2:
        cut = client.post("/v1/completions", json={**body, "prompt": body["prompt"][0], "n": 1, "stop": [text[1:3]]},
                          headers=auth()).json()["choices"][0]
        assert cut["text"] == text[: text.find(text[1:3])] and cut["finish_reason"] == "stop"
    sampled = [client.post("/v1/completions", json={"prompt": "The", "max_tokens": 6, "temperature": 1.0, "top_p": 0.9,
                                                   "seed": 7}, headers=auth()).json()["choices"][0]["text"] for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable
    tiny = client.post("/v1/completions", json={**body, "temperature": 5e-324}, headers=auth())  # overflowed once
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == out["choices"][0]["text"]
    for bad in ({"max_tokens": 10_000}, {"n": 100}, {"prompt": []}, {"temperature": -1}):
        r = client.post("/v1/completions", json={"prompt": "x", **bad}, headers=auth())
        assert r.status_code in (400, 422) and r.json()["error"]["message"], bad
    models = client.get("/v1/models", headers=auth(READ_TOKEN)).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-llama"


def _streamed(client: TestClient, body: dict) -> tuple[dict[int, str], dict[int, str], list[str]]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=auth()) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert chunk["object"] == "text_completion"
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    return texts, finish, lines


@pytest.mark.parametrize("stop", [None, "e", [" t", "an"]])
def test_streamed_completions_add_up_to_the_whole_ones(client, stop):
    body = {"prompt": ["Place 1 is located in", "The river"], "max_tokens": 12, "temperature": 0, "n": 2, "stop": stop}
    whole = client.post("/v1/completions", json=body, headers=auth()).json()["choices"]
    texts, finish, lines = _streamed(client, body)
    assert texts == {c["index"]: c["text"] for c in whole}
    assert finish == {c["index"]: c["finish_reason"] for c in whole}
    assert len(lines) > len(whole) + 1 or all(len(t) < 2 for t in texts.values())  # it did come in pieces


def test_a_completion_never_sees_half_a_step(client):
    """Layer writes of a step are slowed down; a completion asked for mid-step waits for the step's end and
    answers with the weights after it."""
    worker = client.app.state.worker
    bank = worker.editor.bank
    mid_step, step_done = threading.Event(), [0.0]
    original = bank.write

    def slow_write(layer, delta):
        original(layer, delta)
        mid_step.set()
        time.sleep(0.4)  # the step is half written now

    bank.write = slow_write
    try:
        ids = submit(client, fact(60))
        assert mid_step.wait(30)
        t_ask = time.monotonic()
        r = client.post("/v1/completions", json={"prompt": "Place 60 is located in", "max_tokens": 8, "temperature": 0},
                        headers=auth())
        t_answer = time.monotonic()
        states = wait_settled(client, ids)
        step_done[0] = client.get(f"/v1/edits/{ids[0]}", headers=auth()).json()["updated"]
    finally:
        bank.write = original
    assert states[ids[0]]["state"] == "applied"
    assert t_answer - t_ask >= 0.35  # it waited for the remaining layer write(s)
    after = client.post("/v1/completions", json={"prompt": "Place 60 is located in", "max_tokens": 8, "temperature": 0},
                        headers=auth())
    assert r.json()["choices"][0]["text"] == after.json()["choices"][0]["text"]


def test_auth_on_every_route(client):
    """Every route but /healthz and the page shell refuses a missing or unknown token; every route that
    changes something refuses a read token."""
    schema = client.get("/openapi.json", headers=auth(READ_TOKEN)).json()
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() if p != "/healthz" for m in ops]
    routes.append(("GET", "/openapi.json"))
    assert len(routes) >= 14
    for method, path in routes:
        if True:
            path = path.replace("{edit_id}", "x").replace("{fact_id}", "x").replace("{step_id}", "1")
            for headers in ({}, auth("not-a-token-at-all"), {"Authorization": "Basic abc"}):
                r = client.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (method, path, r.text)
                assert r.json()["error"]["code"] == "unauthorized"
            write = method != "GET" and path not in ("/v1/completions", "/v1/chat/completions")
            if write:
                r = client.request(method, path, headers=auth(READ_TOKEN), json={})
                assert r.status_code == 403, (method, path, r.text)
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/").status_code == 200


def test_errors_are_json_without_tracebacks(client):
    cases = [client.post("/v1/edits", content=b"{not json", headers={**auth(), "Content-Type": "application/json"}),
             client.post("/v1/edits", content=b"x" * (2 << 20), headers=auth()),
             client.get("/v1/nothing-here", headers=auth()),
             client.put("/v1/facts", headers=auth()),
             client.get("/v1/facts?limit=-1", headers=auth())]
    assert [r.status_code for r in cases] == [422, 413, 404, 405, 422]
    for r in cases:
        assert set(r.json()["error"]) == {"code", "message", "type"} and "Traceback" not in r.text


def test_config_refuses_public_address_without_token_and_bad_token_files(tmp_path):
    with pytest.raises(ServeConfigError, match="without an API token"):
        ServeConfig(ledger=tmp_path, host="0.0.0.0")
    ServeConfig(ledger=tmp_path, host="0.0.0.0", tokens=TokenTable(write=("x" * 20,)))
    f = tmp_path / "tokens"
    f.write_text("# ops\nread " + "a" * 20 + "\nwrite " + "b" * 20 + "\n")
    assert read_token_file(f, "c" * 20) == TokenTable(read=("a" * 20,), write=("c" * 20, "b" * 20))
    for bad in ("admin " + "a" * 20, "read short", "read"):
        f.write_text(bad + "\n")
        with pytest.raises(ServeConfigError, match="line 1"):
            read_token_file(f)


def test_restart_resumes_the_queue_and_never_applies_twice(tmp_path):
    """Edits queued by a process that died are applied by the next; an edit whose step was committed but
    not marked applied (killed in between) is found in the ledger, not applied again."""
    lm = tiny_model("llama")
    config = make_config(tmp_path)
    q = EditQueue(config.queue_path)
    (queued,) = q.submit([fact(1)])  # accepted (202) just before a crash
    q.close()
    with serve_client(tmp_path, lm=lm) as c:
        assert wait_settled(c, [queued.id])[queued.id]["state"] == "applied"
        worker = c.app.state.worker
        # "dies" between the ledger commit and the queue update: the update is lost and no step follows
        worker.queue.mark_applied = lambda ids, step: worker._stop.set()
        ids = submit(c, fact(2))
        deadline = time.monotonic() + 30
        while worker.view.last_step < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get(f"/v1/edits/{ids[0]}", headers=auth()).json()["state"] == "queued"
    lm2 = tiny_model("llama")
    with serve_client(tmp_path, lm=lm2) as c:
        state = wait_settled(c, ids)[ids[0]]
        assert state["state"] == "applied" and state["step"] == 2
        time.sleep(0.2)
        log = c.get("/v1/log", headers=auth()).json()
        assert log["last_step"] == 2 and log["queue"] == {"queued": 0, "applied": 2, "rejected": 0}


def test_open_api_without_tokens_on_loopback(tmp_path):
    config = make_config(tmp_path, tokens=TokenTable())
    app = create_app(config, load=lambda: tiny_model("llama"))
    with TestClient(app) as c:
        wait_ready(c)
        assert c.get("/v1/facts").status_code == 200
        assert c.get("/openapi.json").json()["info"]["title"] == "seqedit serve"


def test_the_openai_client_works_unchanged(client):
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key=READ_TOKEN, http_client=client)
    r = oa.completions.create(model="seqedit", prompt="Place 1 is located in", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 4 and isinstance(r.choices[0].text, str)
    assert [m.id for m in oa.models.list()] == ["tiny-llama"]
    pieces = list(oa.completions.create(model="seqedit", prompt="Place 1 is located in", max_tokens=4, temperature=0,
                                        stream=True))
    assert "".join(p.choices[0].text for p in pieces) == r.choices[0].text
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError, match="bearer token"):
        openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=client).models.list()


def test_shutdown_finishes_the_step_in_progress(tmp_path):
    """Stopping the app while a step is half written lets the step finish and commit before exit."""
    with serve_client(tmp_path) as c:
        worker = c.app.state.worker
        bank = worker.editor.bank
        mid_step, original = threading.Event(), bank.write

        def slow_write(layer, delta):
            original(layer, delta)
            mid_step.set()
            time.sleep(0.3)

        bank.write = slow_write
        ids = submit(c, fact(1))
        assert mid_step.wait(30)
    # the context exit ran the app's shutdown: the worker finished the step, marked it and closed the ledger
    assert worker.status == "stopped"
    q = EditQueue(tmp_path / "ledger" / "serve-queue.sqlite")
    assert q.get(ids[0]).state == "applied" and q.get(ids[0]).step == 1
    q.close()


def test_not_ready_when_the_ledger_is_damaged(tmp_path):
    with serve_client(tmp_path) as c:
        wait_settled(c, submit(c, fact(1)))
    step_file = next((tmp_path / "ledger" / "steps").iterdir())
    data = bytearray(step_file.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a committed file
    step_file.write_bytes(bytes(data))
    app = create_app(make_config(tmp_path), load=lambda: tiny_model("llama"))
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.app.state.worker.status.endswith(("ing", "ing the model", "ing the ledger")):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = c.get("/readyz", headers=auth())  # the reopen's replay found the damaged file
        assert r.status_code == 503 and "step-000001.safetensors is corrupt" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "x"}, headers=auth()).status_code == 503
        assert c.post("/v1/edits", json=fact(2), headers=auth()).status_code == 202  # still durable, applied later
        time.sleep(0.2)
        assert c.get("/v1/log", headers=auth()).json()["queue"]["queued"] == 1  # but not applied on a bad ledger


def test_the_command_refuses_a_public_address_without_a_token(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from seqedit.cli import app

    monkeypatch.delenv("SEQEDIT_API_TOKEN", raising=False)
    run = CliRunner().invoke(app, ["serve", "--ledger", str(tmp_path / "L"), "--model", "m", "--host", "0.0.0.0"])
    assert run.exit_code == 2 and "without an API token" in run.output
    (tmp_path / "tokens").write_text("write short\n")
    run = CliRunner().invoke(app, ["serve", "--ledger", str(tmp_path / "L"), "--model", "m", "--token-file",
                                   str(tmp_path / "tokens")])
    assert run.exit_code == 2 and "at least 16 characters" in run.output
    run = CliRunner().invoke(app, ["serve", "--ledger", str(tmp_path / "L")])
    assert run.exit_code == 2 and "--model is needed" in run.output


def test_a_new_ledger_is_created_by_the_first_edit_not_at_start(tmp_path):
    """docs/serve.md: the ledger is created on the first edit; until then the service is ready, lists no
    step and no fact, and its folder holds only the queue."""
    from seqedit.ledger import Ledger

    with serve_client(tmp_path) as c:
        assert not Ledger.exists(tmp_path / "ledger")
        assert c.get("/v1/facts", headers=auth(READ_TOKEN)).json()["facts"] == []
        states = wait_settled(c, submit(c, fact(1)))
        assert {s["state"] for s in states.values()} == {"applied"}
        assert Ledger.exists(tmp_path / "ledger")
