"""Prometheus metrics of the server (names in docs/architecture.md). One registry per app, so several
servers (or tests) in one process do not collide in the global registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; CPU tiny models answer in milliseconds, large models on GPUs in tens of seconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kubetune_serve_requests",
            "Finished HTTP requests to the API by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kubetune_serve_request_latency_seconds",
            "Time from receiving a generation request to its last byte",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "kubetune_serve_time_to_first_token_seconds",
            "Time from receiving a generation request to its first generated token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "kubetune_serve_generated_tokens", "Generated (completion) tokens", registry=self.registry
        )
        self.prompt_tokens = Counter("kubetune_serve_prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        self.cached_prompt_tokens = Counter(
            "kubetune_serve_cached_prompt_tokens",
            "Prompt tokens taken from the prefix cache instead of computed",
            registry=self.registry,
        )
        self.running = Gauge(
            "kubetune_serve_running_sequences", "Sequences in the running batch", registry=self.registry
        )
        self.waiting = Gauge(
            "kubetune_serve_waiting_sequences", "Sequences waiting for a place in the batch", registry=self.registry
        )
        self.cancelled = Counter(
            "kubetune_serve_cancelled_sequences",
            "Sequences stopped early because the client went away",
            registry=self.registry,
        )
