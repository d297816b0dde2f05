"""Operations: ``/metrics`` in the Prometheus text format (parsed back with ``prometheus-client``),
structured JSON access logs, and ``seqedit serve --workers N`` refused with its reason."""

from __future__ import annotations

import json
import logging

import pytest
from serve_helpers import READ_TOKEN, auth, fact, serve_client, wait_settled

from seqedit.serve.logs import JsonFormatter

prometheus = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_count_queue_steps_latency_and_facts(tmp_path):
    with serve_client(tmp_path) as c:
        assert c.get("/metrics").status_code == 401  # behind a token, as the rest of the API
        ids = [e["id"] for e in c.post("/v1/edits", json={"facts": [fact(1), fact(2), fact(3)]}, headers=auth()).json()["edits"]]
        wait_settled(c, ids)
        c.post("/v1/completions", json={"prompt": "Place 1 is", "max_tokens": 2}, headers=auth(READ_TOKEN))
        greedy = c.post("/v1/completions", json={"prompt": "Place 2 is", "max_tokens": 3, "temperature": 0},
                        headers=auth(READ_TOKEN)).json()["usage"]["completion_tokens"]
        c.get("/v1/edits/nope", headers=auth())
        c.get("/no/such/path/123", headers=auth())
        r = c.get("/metrics", headers=auth(READ_TOKEN))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        s = _samples(r.text)
    assert s[("seqedit_facts_in_force", ())] == 3
    assert s[("seqedit_queue_edits", (("state", "applied"),))] == 3
    assert s[("seqedit_queue_edits", (("state", "queued"),))] == 0
    assert s[("seqedit_ledger_last_step", ())] >= 1 and s[("seqedit_ready", ())] == 1
    assert s[("seqedit_batch_steps_total", (("outcome", "applied"),))] >= 1
    assert s[("seqedit_step_seconds_count", ())] == s[("seqedit_batch_steps_total", (("outcome", "applied"),))]
    assert s[("seqedit_step_seconds_sum", ())] > 0 and s[("seqedit_facts_applied_total", ())] == 3
    # the greedy request went through the batched decode: a step for each token after the first
    assert s[("seqedit_decode_steps_total", (("requests", "one"),))] == greedy - 1
    assert s[("seqedit_decode_steps_total", (("requests", "several"),))] == 0
    assert s[("seqedit_decode_rows", ())] == 0  # nothing decoding once it answered
    post = (("method", "POST"), ("route", "/v1/completions"))
    assert s[("seqedit_http_request_seconds_count", post)] == 2
    assert s[("seqedit_http_requests_total", (*post, ("status", "200")))] == 2
    assert s[("seqedit_http_requests_total", (("method", "GET"), ("route", "/v1/edits/{edit_id}"), ("status", "404")))] == 1
    assert s[("seqedit_http_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    assert not any("/no/such" in str(k) for k in s)  # paths never become labels


def test_access_logs_are_json_lines_without_secrets(tmp_path):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("seqedit.serve")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with serve_client(tmp_path) as c:
            c.post("/v1/completions", json={"prompt": "secret prompt", "max_tokens": 2}, headers=auth())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(JsonFormatter().format(r)) for r in records if getattr(r, "event", None) == "request"]
    line = next(x for x in lines if x["route"] == "/v1/completions")
    assert line["method"] == "POST" and line["status"] == 200 and line["ms"] > 0 and line["bytes"] > 0
    assert {"ts", "level", "client", "path"} <= set(line)
    text = json.dumps(lines)
    assert "secret prompt" not in text and "w" * 24 not in text  # neither bodies nor tokens


def test_more_than_one_worker_process_is_refused(tmp_path):
    from typer.testing import CliRunner

    from seqedit.cli import app

    run = CliRunner().invoke(app, ["serve", "--ledger", str(tmp_path / "L"), "--model", "m", "--workers", "4"])
    assert run.exit_code == 2 and "--workers 4" in run.output and "one process owns the editor" in run.output
