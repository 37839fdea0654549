"""The operator's own Prometheus metrics (served on ``:8080/metrics`` by ``lmforge operator``).

=============================================  ===========================================================
series                                         meaning
=============================================  ===========================================================
``lmforge_operator_reconciles_total``          reconciles by ``kind`` and ``result`` (ok | error)
``lmforge_operator_reconcile_seconds``         histogram of reconcile durations by ``kind``
``lmforge_operator_resources``                 resources by ``kind`` and ``phase`` (Pending … Invalid)
``lmforge_operator_children_created_total``    child objects created by ``kind`` (of the owner) and
                                               ``child`` (ConfigMap, Service, NetworkPolicy, Job)
``lmforge_operator_queue_depth``               resources waiting to be reconciled
=============================================  ===========================================================

A private registry, so several operators in one process (tests) never clash with the jobs' gauges.
"""

from __future__ import annotations

from typing import Any

from lmforge_jobs.kinds import KINDS

PHASES = ("Pending", "Waiting", "Running", "Succeeded", "Failed", "Invalid")


class OperatorMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "lmforge_operator_reconciles",
            "Reconciles by kind and result (ok, error).",
            ["kind", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "lmforge_operator_reconcile_seconds",
            "Duration of one reconcile.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.resources = Gauge(
            "lmforge_operator_resources",
            "Resources by kind and phase.",
            ["kind", "phase"],
            registry=self.registry,
        )
        self.children = Counter(
            "lmforge_operator_children_created",
            "Child objects created, by owner kind and child kind.",
            ["kind", "child"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "lmforge_operator_queue_depth", "Resources waiting to be reconciled.", registry=self.registry
        )
        self._phases: dict[tuple[str, str, str], str] = {}
        for kind in KINDS:
            for phase in PHASES:
                self.resources.labels(kind, phase).set(0)
            for result in ("ok", "error"):
                self.reconciles.labels(kind, result)
        self._server: Any = None

    def phase(self, kind: str, namespace: str, name: str, phase: str | None) -> None:
        """Record the phase of one resource (None: it is gone)."""
        key = (kind, namespace, name)
        old = self._phases.pop(key, None)
        if phase is not None:
            self._phases[key] = phase
        if old == phase:
            return
        if old is not None:
            self.resources.labels(kind, old).dec()
        if phase is not None:
            self.resources.labels(kind, phase).inc()

    def serve(self, port: int) -> int:
        """Start the HTTP endpoint (once); returns the port it listens on."""
        from prometheus_client import start_http_server

        if self._server is None:
            server, _ = start_http_server(port, addr="0.0.0.0", registry=self.registry)
            self._server = server
        return int(self._server.server_address[1])


__all__ = ["OperatorMetrics"]
