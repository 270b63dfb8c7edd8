"""Prometheus metrics of one server, in a registry of its own (several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
SECOND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("moee_requests", "Requests answered, by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.duration = Histogram("moee_request_duration_seconds", "Time from the request to its answer", ["endpoint"],
                                  buckets=SECOND_BUCKETS, registry=r)
        self.queue_inputs = Gauge("moee_queue_inputs", "Inputs queued for the worker", registry=r)
        self.queue_tokens = Gauge("moee_queue_tokens", "Tokens of the inputs queued for the worker", registry=r)
        self.batch_size = Histogram("moee_batch_size", "Inputs per computed batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("moee_batch_tokens", "Tokens per computed batch (prompts included)", buckets=TOKEN_BUCKETS, registry=r)
        self.compute = Histogram("moee_batch_compute_seconds", "Worker time per batch", buckets=SECOND_BUCKETS, registry=r)
        self.inputs = Counter("moee_inputs", "Inputs computed", registry=r)
        self.tokens = Counter("moee_tokens", "Tokens computed (prompts included)", registry=r)
        self.worker_alive = Gauge("moee_worker_alive", "1 while the worker thread can compute", registry=r)
        self.worker_alive.set(1)

    def observe_batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)
        self.compute.observe(seconds)
        self.inputs.inc(size)
        self.tokens.inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
