"""Prometheus metrics of one server: request counts and latencies per model, TTFT, queue, adapters.

Each server gets its own CollectorRegistry, so several servers (tests) can live in one process.
Series are labelled only with served models (the base and loaded adapters): an unloaded adapter's
series are dropped and its late requests count under UNLOADED, so adapter names that come and go
do not pile up series without bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
UNLOADED = "(unloaded)"  # the model label of requests that finish after their adapter was unloaded


class ServerMetrics:
    """The counters, histograms and gauges exported at /metrics."""

    def __init__(self, *, queue_depth: Callable[[], float], running: Callable[[], float],
                 loaded_adapters: Callable[[], float], served: Callable[[str], bool] = lambda model: True):
        self.served = served
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

    def model(self, model: str) -> str:
        """The `model` label for a request's model: itself while served, else UNLOADED."""
        return model if self.served(model) else UNLOADED

    def forget(self, model: str) -> None:
        """Drop every series labelled with this model (an adapter just unloaded)."""
        series = [(metric, (model,)) for metric in (self.latency, self.ttft, self.tokens, self.prompt_tokens)]
        series += [(self.requests, (model, s.labels["endpoint"], s.labels["status"]))
                   for f in self.requests.collect() for s in f.samples if s.labels["model"] == model]
        for metric, labels in dict.fromkeys(series):
            with contextlib.suppress(KeyError):  # absent: prometheus-client before 0.21 raises
                metric.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
