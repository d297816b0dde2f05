"""``/metrics`` in the Prometheus text format (``prometheus-client``), one registry per app.

Measured as they happen: request latency (histogram by method and route template, so unmatched paths
cannot grow the label set), requests by status, and the seconds of each batch step. Read at scrape
time from the worker and the queue: queue depth per state, facts in force, the ledger's last step,
steps applied and failed, waiting jobs, readiness and the current retry backoff, and the batched
decode's rows now, its steps and how many of them served more than one request.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class _State:
    """A collector of what the worker and the queue hold now."""

    def __init__(self, worker: Any, queue: Any) -> None:
        self.worker, self.queue = worker, queue

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("seqedit_queue_edits", "Edits in the durable queue, by state", labels=["state"])
        for state, n in self.queue.counts().items():
            depth.add_metric([state], n)
        yield depth
        w = self.worker
        yield GaugeMetricFamily("seqedit_facts_in_force", "Facts in force in the served weights", value=len(w.view.facts))
        yield GaugeMetricFamily("seqedit_ledger_last_step", "The ledger's last step id", value=w.view.last_step)
        steps = CounterMetricFamily("seqedit_batch_steps", "Batch steps the worker tried, by outcome", labels=["outcome"])
        steps.add_metric(["applied"], w.steps_applied)
        steps.add_metric(["failed"], w.steps_failed)
        yield steps
        yield GaugeMetricFamily("seqedit_jobs_waiting", "Forget/undo/verify/export jobs waiting", value=len(w.jobs))
        yield GaugeMetricFamily("seqedit_ready", "1 when the model is loaded and the ledger verified",
                                value=1.0 if w.ready else 0.0)
        yield GaugeMetricFamily("seqedit_step_backoff_seconds", "Wait before retrying a failed step (0: none)",
                                value=w.backoff_s)
        b = w.batcher.counts if w.batcher is not None else None
        if b is not None:
            yield GaugeMetricFamily("seqedit_decode_rows", "Greedy prompts decoding together now", value=b.live_rows)
            decode = CounterMetricFamily("seqedit_decode_steps", "Batched decode steps, by how many requests they served",
                                         labels=["requests"])
            decode.add_metric(["one"], b.steps - b.shared_steps)
            decode.add_metric(["several"], b.shared_steps)
            yield decode


class Metrics:
    """The app's registry: ``observe_request`` from the access log, ``observe_step`` from the worker."""

    def __init__(self, worker: Any, queue: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("seqedit_http_requests", "HTTP requests by method, route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("seqedit_http_request_seconds", "HTTP request latency (until the last byte)",
                                 ["method", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.step_seconds = Histogram("seqedit_step_seconds", "Seconds of each applied batch step",
                                      buckets=_STEP_BUCKETS, registry=self.registry)
        self.step_facts = Counter("seqedit_facts_applied", "Facts applied by batch steps", registry=self.registry)
        self.registry.register(_State(worker, queue))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_step(self, seconds: float, facts: int) -> None:
        self.step_seconds.observe(seconds)
        self.step_facts.inc(facts)

    def render(self) -> bytes:
        return generate_latest(self.registry)
