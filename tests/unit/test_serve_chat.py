"""``/v1/chat/completions`` and the OpenAI options of ``/v1/completions`` (``stop``, ``n``, ``logprobs``,
``top_logprobs``, ``echo``; anything else refused by name) on a tiny random llama with a ``both`` ledger,
in process, also through the real ``openai`` client."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
from serve_helpers import EDITOR_OPTIONS, READ_TOKEN, auth, fact, serve_client, wait_settled

from seqedit.locate.chat import chat_prompt

QUESTION = "Place 1 is located in what?"
MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with serve_client(tmp_path_factory.mktemp("chat"), editor_options={**EDITOR_OPTIONS, "prompt_format": "both"}) as c:
        yield c


def post(client, path: str, body: dict, status: int = 200) -> dict:
    r = client.post(path, json=body, headers=auth(READ_TOKEN))
    assert r.status_code == status, r.text
    return r.json()


def test_chat_goes_through_the_chat_template(client):
    out = post(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "n": 2})
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert {c["message"]["role"] for c in out["choices"]} == {"assistant"}
    assert out["choices"][0]["message"]["content"] == out["choices"][1]["message"]["content"]  # greedy
    # the same text as a bare completion of the rendered conversation: the chat template was applied
    rendered = chat_prompt(client.app.state.worker.loaded.tokenizer, QUESTION)[0]
    bare = post(client, "/v1/completions", {"prompt": rendered, "max_tokens": 8, "temperature": 0})
    assert out["choices"][0]["message"]["content"] == bare["choices"][0]["text"]
    assert out["usage"]["prompt_tokens"] == bare["usage"]["prompt_tokens"]
    system = post(client, "/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."}, *MESSAGES],
                                                   "max_tokens": 8, "temperature": 0})
    assert system["usage"]["prompt_tokens"] != out["usage"]["prompt_tokens"]  # the system turn replaced the default
    parts = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Place 1 is located"}, {"type": "text", "text": " in what?"}]}],
        "max_tokens": 8, "temperature": 0})
    assert parts["choices"][0]["message"]["content"] == out["choices"][0]["message"]["content"]


def test_chat_stop_and_streaming_add_up(client):
    whole = post(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    text = whole["choices"][0]["message"]["content"]
    if len(text) > 3:
        cut = post(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 12, "temperature": 0,
                                                    "stop": text[2:4]})["choices"][0]
        assert cut["message"]["content"] == text[: text.find(text[2:4])] and cut["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions", headers=auth(),
                       json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True, "n": 2}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    texts, finish, roles = {}, {}, set()
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert chunk["object"] == "chat.completion.chunk"
        (c,) = chunk["choices"]
        roles.add(c["delta"].get("role"))
        texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert texts == {0: text, 1: text} and finish == {0: whole["choices"][0]["finish_reason"]} | {1: finish[0]}
    assert "assistant" in roles


def test_chat_logprobs(client):
    out = post(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "temperature": 0,
                                                "logprobs": True, "top_logprobs": 3})
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    for t in content:
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 3 and t["bytes"] == list(t["token"].encode())
        tops = [a["logprob"] for a in t["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        assert math.isclose(t["logprob"], tops[0], abs_tol=1e-9)  # greedy picks the most probable token
    plain = post(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "temperature": 0})
    assert plain["choices"][0]["logprobs"] is None


def test_completion_logprobs_and_echo(client):
    prompt = "Place 1 is located in"
    out = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2})
    c = out["choices"][0]
    lp = c["logprobs"]
    assert "".join(lp["tokens"]) == c["text"] and len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert all(len(t) == 2 for t in lp["top_logprobs"])
    assert all(c["text"][o:].startswith(t) for t, o in zip(lp["tokens"], lp["text_offset"]))
    echo = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2,
                                            "echo": True})["choices"][0]
    assert echo["text"] == prompt + c["text"]
    elp = echo["logprobs"]
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"][0] is None  # nothing predicts the first token
    assert "".join(elp["tokens"]) == echo["text"]
    n_prompt = len(elp["tokens"]) - len(lp["tokens"])
    assert elp["token_logprobs"][n_prompt:] == lp["token_logprobs"]
    # scoring the whole text (max_tokens 0) gives the generated tokens the log-probabilities they were generated with
    scored = post(client, "/v1/completions", {"prompt": prompt + c["text"], "max_tokens": 0, "echo": True,
                                              "logprobs": 0})["choices"][0]
    assert scored["text"] == prompt + c["text"] and scored["finish_reason"] == "length"
    if scored["logprobs"]["tokens"] == elp["tokens"]:  # the same tokenisation of the joined text
        assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
                   for a, b in zip(scored["logprobs"]["token_logprobs"][1:], elp["token_logprobs"][1:]))
    plain_echo = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": True})
    assert plain_echo["choices"][0]["text"] == prompt + c["text"] and plain_echo["choices"][0]["logprobs"] is None
    texts = {}
    with client.stream("POST", "/v1/completions", headers=auth(),
                       json={"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ch = json.loads(line.removeprefix("data: "))["choices"][0]
                texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert texts == {0: prompt + c["text"]}


@pytest.mark.parametrize("path,extra,field", [
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", {"stream": True, "logprobs": 1}, "logprobs"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"frequency_penalty": 1.0}, "frequency_penalty"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"stream": True, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
])
def test_an_unsupported_field_is_refused_by_name(client, path, extra, field):
    base = {"prompt": "The"} if path == "/v1/completions" else {"messages": MESSAGES}
    out = post(client, path, {**base, "max_tokens": 4, **extra}, status=400)
    assert field in out["error"]["message"]


def test_neutral_values_of_unimplemented_fields_are_accepted(client):
    for path, base in (("/v1/completions", {"prompt": "The"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        post(client, path, {**base, "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None})


def test_the_openai_client_chats(client):
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key=READ_TOKEN, http_client=client)
    r = oa.chat.completions.create(model="seqedit", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                   top_logprobs=2, n=2)
    assert r.object == "chat.completion" and len(r.choices) == 2 and r.choices[0].message.role == "assistant"
    assert "".join(t.token for t in r.choices[0].logprobs.content) == r.choices[0].message.content
    pieces = list(oa.chat.completions.create(model="seqedit", messages=MESSAGES, max_tokens=6, temperature=0,
                                             stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == r.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    legacy = oa.completions.create(model="seqedit", prompt="The", max_tokens=3, temperature=0, logprobs=1, echo=True)
    assert legacy.choices[0].text.startswith("The") and legacy.choices[0].logprobs.token_logprobs[0] is None
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        oa.chat.completions.create(model="seqedit", messages=MESSAGES, presence_penalty=1.0)


def test_a_chat_answer_never_sees_half_a_step(client):
    """Chat holds the same weights lock as completions: asked mid-step, it waits for the step's end and
    answers from the weights after it (the step is a ``both`` step: bare and chat rows)."""
    worker = client.app.state.worker
    bank = worker.editor.bank
    mid_step = threading.Event()
    original = bank.write

    def slow_write(layer, delta):
        original(layer, delta)
        mid_step.set()
        time.sleep(0.4)

    ask = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    bank.write = slow_write
    try:
        r = client.post("/v1/edits", json=fact(1, target="Paris"), headers=auth())
        ids = [e["id"] for e in r.json()["edits"]]
        assert mid_step.wait(30)
        t_ask = time.monotonic()
        during = post(client, "/v1/chat/completions", ask)
        waited = time.monotonic() - t_ask
        states = wait_settled(client, ids)
    finally:
        bank.write = original
    assert states[ids[0]]["state"] == "applied" and waited >= 0.35
    assert during["choices"][0]["message"]["content"] == post(client, "/v1/chat/completions", ask)["choices"][0]["message"]["content"]
