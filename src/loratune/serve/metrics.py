"""Prometheus metrics of one server: request counts and latencies per model, TTFT, queue, adapters.

Each server gets its own CollectorRegistry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """The counters, histograms and gauges exported at /metrics."""

    def __init__(self, *, queue_depth: Callable[[], float], running: Callable[[], float],
                 loaded_adapters: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loratune_requests", "Finished HTTP generation requests.",
                                ["model", "endpoint", "status"], registry=r)
        self.latency = Histogram("loratune_request_latency_seconds", "Time from request to last token.",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loratune_time_to_first_token_seconds", "Time from request to first token.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("loratune_generated_tokens", "Generated tokens.", ["model"], registry=r)
        self.prompt_tokens = Counter("loratune_prompt_tokens", "Prompt tokens.", ["model"], registry=r)
        Gauge("loratune_queue_depth", "Requests waiting for a batch slot.",
              registry=r).set_function(queue_depth)
        Gauge("loratune_running_requests", "Requests in the running batch.",
              registry=r).set_function(running)
        Gauge("loratune_loaded_adapters", "Adapters loaded and visible.",
              registry=r).set_function(loaded_adapters)

    def render(self) -> bytes:
        return generate_latest(self.registry)
