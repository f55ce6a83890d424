"""The operator's own Prometheus metrics (served on :8080/metrics by `kubetune operator`).

A CollectorRegistry per operator instance, so tests and the benchmark can run several."""
from __future__ import annotations

import threading
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended")


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("kubetune_operator_jobs", "Custom resources by kind and phase", ["kind", "phase"], registry=self.registry)
        self.reconcile_seconds = Histogram(
            "kubetune_operator_reconcile_duration_seconds", "Time spent in a handler", ["kind", "handler"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "kubetune_operator_reconcile_errors", "Handler runs that ended in an error (retried)", ["kind", "handler"], registry=self.registry
        )
        labels = ["namespace", "name"]
        self.job_step = Gauge("kubetune_job_step", "Training step of a FineTuneJob (from rank 0)", labels, registry=self.registry)
        self.job_total_steps = Gauge("kubetune_job_total_steps", "Total steps of a FineTuneJob", labels, registry=self.registry)
        self.job_loss = Gauge("kubetune_job_loss", "Latest training loss of a FineTuneJob", labels, registry=self.registry)
        self.job_tokens_per_second = Gauge("kubetune_job_tokens_per_second", "Training throughput of a FineTuneJob", labels, registry=self.registry)
        self._phases: dict[tuple[str, str, str], str] = {}  # (kind, namespace, name) -> phase
        self._lock = threading.Lock()
        self._server: Any = None

    def set_phase(self, kind: str, namespace: str, name: str, phase: Optional[str]) -> None:
        with self._lock:
            key = (kind, namespace, name)
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            counts = {p: 0 for p in PHASES}
            for (k, _, _), p in self._phases.items():
                if k == kind:
                    counts[p] = counts.get(p, 0) + 1
            for p, count in counts.items():
                self.jobs.labels(kind=kind, phase=p).set(count)

    def set_progress(self, namespace: str, name: str, progress: dict[str, Any]) -> None:
        for gauge, field in (
            (self.job_step, "step"), (self.job_total_steps, "totalSteps"),
            (self.job_loss, "loss"), (self.job_tokens_per_second, "tokensPerSecond"),
        ):
            if progress.get(field) is not None:
                gauge.labels(namespace=namespace, name=name).set(progress[field])

    def forget(self, kind: str, namespace: str, name: str) -> None:
        self.set_phase(kind, namespace, name, None)
        for gauge in (self.job_step, self.job_total_steps, self.job_loss, self.job_tokens_per_second):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP server in a thread; returns the port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
