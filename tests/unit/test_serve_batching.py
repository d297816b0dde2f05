"""Dynamic batching of greedy completions (serve/batching.py): a left-padded batch answers each prompt
exactly as it is answered alone, and concurrent requests to the app share forward passes."""

from __future__ import annotations

import threading

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
    assert together == alone
    assert len({len(i) for i in ids}) > 1  # the rows really were padded


def test_concurrent_requests_share_forward_passes(tmp_path):
    with serve_client(tmp_path, batch_wait_s=0.2) as c:
        ask = [{"prompt": p, "max_tokens": 10, "temperature": 0} for p in PROMPTS * 2]
        alone = [c.post("/v1/completions", json=a, headers=auth(READ_TOKEN)).json()["choices"][0]["text"] for a in ask]
        batcher = c.app.state.worker.batcher
        before = batcher.batches
        got: dict[int, str] = {}

        def one(k: int) -> None:
            got[k] = c.post("/v1/completions", json=ask[k], headers=auth(READ_TOKEN)).json()["choices"][0]["text"]

        threads = [threading.Thread(target=one, args=(k,)) for k in range(len(ask))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[k] for k in range(len(ask))] == alone
        assert batcher.batches - before < len(ask)  # some requests shared a generate call


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
