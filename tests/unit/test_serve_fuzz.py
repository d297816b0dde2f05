"""Schema fuzzing: requests generated from the service's own OpenAPI schema (bodies valid for their
schema, parameters of the declared types) mixed with arbitrary JSON, against the app in process on a
tiny model. No request may yield a 500 or a traceback; every error is the JSON error shape.
Bounded: 1,100 requests and a time budget."""

from __future__ import annotations

import json
import string
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_strategies import JSON, from_schema
from serve_helpers import WRITE_TOKEN, auth, serve_client

REQUESTS = 1100
BUDGET_S = 90

pytestmark = pytest.mark.filterwarnings("ignore")

HEADER_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=40)


def _param(schema: dict) -> st.SearchStrategy:
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(-5, 10**6) | st.integers(schema.get("minimum", 0), min(schema.get("maximum", 50), 50))
    return st.text(alphabet=string.ascii_letters + string.digits + "-_ %./", min_size=1, max_size=30)


def _operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [(m.upper(), path, op) for path, ops in spec["paths"].items() for m, op in ops.items()]


def _request(spec: dict, method: str, path: str, op: dict) -> st.SearchStrategy:
    params = op.get("parameters", [])
    path_args = {p["name"]: _param(p["schema"]) for p in params if p["in"] == "path"}
    query_args = {p["name"]: _param(p["schema"]) for p in params if p["in"] == "query"}
    body = st.none()
    if "requestBody" in op:
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        body = from_schema(schema, spec["components"]) | JSON
    return st.fixed_dictionaries({
        "path": st.fixed_dictionaries(path_args),
        "query": st.fixed_dictionaries({k: st.none() | v for k, v in query_args.items()}),
        "body": body,
        "key": st.none() | HEADER_TEXT,
        "token": st.sampled_from([WRITE_TOKEN] * 9 + [None]),
    }).map(lambda r: (method, path, r))


def test_no_generated_request_yields_a_500(tmp_path):
    with serve_client(tmp_path, max_tokens=4, max_n=2, max_prompts=2, max_batch=32) as client:
        spec = client.get("/openapi.json", headers=auth()).json()
        ops = _operations(spec)
        assert len(ops) >= 13
        requests = st.one_of([_request(spec, *o) for o in ops])
        seen: dict[int, int] = {}
        t0 = time.monotonic()

        @settings(max_examples=REQUESTS, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(requests)
        def one(req) -> None:
            if time.monotonic() - t0 > BUDGET_S:
                return
            method, path, r = req
            for name, value in r["path"].items():
                path = path.replace("{" + name + "}", str(value).replace("/", "%2F"))
            headers = {"Idempotency-Key": r["key"]} if r["key"] else {}
            if r["token"]:
                headers |= auth(r["token"])
            query = {k: v for k, v in r["query"].items() if v is not None}
            content = None if r["body"] is None else json.dumps(r["body"])
            if content is not None:
                headers["Content-Type"] = "application/json"
            resp = client.request(method, path, params=query, content=content, headers=headers)
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            assert resp.status_code < 500 or resp.status_code == 503, (method, path, r, resp.text)
            assert "Traceback" not in resp.text
            if resp.status_code >= 400:
                err = resp.json()["error"]
                assert err["code"] and err["message"], resp.text

        one()
        total = sum(seen.values())
        print(f"\nserve fuzz: {total} requests in {time.monotonic() - t0:.1f}s, status counts {dict(sorted(seen.items()))}")
        assert total >= 1000 and 500 not in seen
        assert client.post("/v1/verify", headers=auth()).json()["ok"]
