"""Dynamic batching of greedy completions (serve/batching.py): a left-padded batch answers each prompt
exactly as it is answered alone, and concurrent requests to the app share forward passes."""

from __future__ import annotations

import threading

import pytest

from serve_helpers import READ_TOKEN, auth, serve_client

from seqedit.serve.batching import complete_batch
from seqedit.serve.generate import complete, prompt_ids
from seqedit.testing import tiny_model

PROMPTS = ["Place 1 is located in", "The", "A river runs through the old town of Place 12 and", "Place 3 is"]


def test_a_batch_answers_each_prompt_as_alone():
    lm = tiny_model("llama")
    ids = [prompt_ids(lm, p) for p in PROMPTS]
    limits, stops = [12, 3, 8, 12], [[], [], [" t"], ["e"]]
    alone = [complete(lm, i, max_tokens=m, temperature=0, top_p=1, n=1, stops=s)[0]
             for i, m, s in zip(ids, limits, stops)]
    together = complete_batch(lm, ids, limits, stops)
    assert [(c.text, c.finish_reason) for c in together] == [(c.text, c.finish_reason) for c in alone]
    # a batched row stops generating at its stop string; one alone runs on to max_tokens, then is cut
    for c, a, s in zip(together, alone, stops):
        assert c.tokens == a.tokens if not s or a.finish_reason == "length" else c.tokens <= a.tokens
    assert together[3].tokens < alone[3].tokens  # the stop string did end that row early
    assert len({len(i) for i in ids}) > 1  # the rows really were padded


def test_concurrent_requests_share_forward_passes(tmp_path):
    with serve_client(tmp_path, batch_wait_s=0.2) as c:
        ask = [{"prompt": p, "max_tokens": 10, "temperature": 0} for p in PROMPTS * 2]
        alone = [c.post("/v1/completions", json=a, headers=auth(READ_TOKEN)).json()["choices"][0]["text"] for a in ask]
        batcher = c.app.state.worker.batcher
        before = batcher.counts.shared_steps
        got: dict[int, str] = {}

        def one(k: int) -> None:
            got[k] = c.post("/v1/completions", json=ask[k], headers=auth(READ_TOKEN)).json()["choices"][0]["text"]

        threads = [threading.Thread(target=one, args=(k,)) for k in range(len(ask))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[k] for k in range(len(ask))] == alone
        assert batcher.counts.shared_steps > before  # some requests shared decode steps


def test_a_closed_batcher_answers_what_is_still_queued():
    from seqedit.serve.batching import Batcher
    from seqedit.serve.errors import ApiError

    lm = tiny_model("llama")
    gate, holding = threading.Event(), threading.Event()

    class Held:  # the first batch holds the lock until the batcher is closed
        def __enter__(self):
            holding.set()
            gate.wait(30)

        def __exit__(self, *exc):
            return False

    b = Batcher(lm, Held, max_rows=1, wait_s=0.0)
    outcomes: dict[int, object] = {}  # by asker: the order in which they finish is not the point

    def ask(k: int) -> None:
        try:
            outcomes[k] = b.complete([prompt_ids(lm, "The")], 2, [])
        except ApiError as e:
            outcomes[k] = e.status

    import time

    threads = [threading.Thread(target=ask, args=(0,))]
    threads[0].start()
    assert holding.wait(30)  # its batch runs, and holds the lock
    closer = threading.Thread(target=b.close)
    closer.start()
    time.sleep(0.1)
    threads += [threading.Thread(target=ask, args=(k,)) for k in (1, 2)]  # queued behind the close
    for t in threads[1:]:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads + [closer]:
        t.join(30)
    assert not any(t.is_alive() for t in threads)  # nobody waits forever
    assert isinstance(outcomes[0], list) and outcomes[1] == outcomes[2] == 503


class _Sessions:
    """A read lock that counts how often it was taken (a "session" of the decode thread)."""

    def __init__(self) -> None:
        self.taken = 0

    def __call__(self):
        import contextlib

        self.taken += 1
        return contextlib.nullcontext()


def _hold_first_step(monkeypatch, until) -> threading.Event:
    """Make the batcher's first decode step wait (≤ 30 s) until ``until()``; the event returned is set
    once it waits. Requests asked after that are queued while other rows are mid-decode, and the
    next boundary between steps finds them all."""
    import time

    from seqedit.serve import batching

    inside, calls, real = threading.Event(), [0], batching.step

    def held(lm, rows):
        calls[0] += 1
        if calls[0] == 1:
            inside.set()
            deadline = time.monotonic() + 30
            while not until() and time.monotonic() < deadline:
                time.sleep(0.005)
        return real(lm, rows)

    monkeypatch.setattr(batching, "step", held)
    return inside


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gptj"])
def test_requests_join_running_rows_and_answer_as_alone(monkeypatch, family):
    from seqedit.serve.batching import Batcher

    lm = tiny_model(family)
    asks = [(["A river runs through the old town of Place 12 and"], 24, []), (["The", "Place 3 is"], 9, []),
            (["Place 1 is located in"], 12, ["e"])]
    alone = [[complete(lm, prompt_ids(lm, p), max_tokens=m, temperature=0, top_p=1, n=1, stops=s)[0] for p in ps]
             for ps, m, s in asks]
    b = Batcher(lm, _Sessions(), max_rows=8, wait_s=0.0)
    inside = _hold_first_step(monkeypatch, lambda: b._queue.qsize() >= 2)
    got: dict[int, list] = {}
    threads = [threading.Thread(target=lambda k=k: got.__setitem__(
        k, b.complete([prompt_ids(lm, p) for p in asks[k][0]], asks[k][1], asks[k][2]))) for k in range(3)]
    threads[0].start()
    assert inside.wait(30)  # the first request decodes alone before the others are asked
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    b.close()
    for k in range(3):
        assert [(c.text, c.finish_reason) for c in got[k]] == [(c.text, c.finish_reason) for c in alone[k]]
    assert b.counts.batches == 2 and b.read_lock.taken == 1  # the later two joined the running rows, in one group
    assert b.counts.shared_steps > 0


def test_no_request_joins_while_a_writer_waits(monkeypatch):
    from seqedit.serve.batching import Batcher

    lm = tiny_model("llama")
    waiting = threading.Event()
    sessions = _Sessions()
    b = Batcher(lm, sessions, max_rows=8, wait_s=0.0, writer_waiting=waiting.is_set)
    inside = _hold_first_step(monkeypatch, lambda: b._queue.qsize() >= 1)
    first = threading.Thread(target=lambda: b.complete([prompt_ids(lm, "The")], 12, []))
    first.start()
    assert inside.wait(30)
    waiting.set()  # a ledger step asks for the weights: the running rows finish, nobody joins them
    second = b.complete([prompt_ids(lm, "Place 3 is")], 4, [])
    first.join(60)
    b.close()
    assert second and b.counts.batches == 2
    assert sessions.taken == 2  # the second request ran in a new read-lock session, after the lock was let go
    assert b.counts.shared_steps == 0
