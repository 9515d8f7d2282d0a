"""Scheduler metrics (injected registry, bounded labels)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sluice.telemetry import RPC_LATENCY_BUCKETS


class SchedulerMetrics:
    """Everything the scheduler records."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sluice_scheduler_requests",
            "Requests by kind, workload class and outcome (ok, cached, refused, failed).",
            ["kind", "workload_class", "outcome"],
            registry=registry,
        )
        self.dispatches = Counter(
            "sluice_scheduler_dispatches",
            "Requests sent to a node, by node and result.",
            ["node", "result"],
            registry=registry,
        )
        self.retries = Counter(
            "sluice_scheduler_retries",
            "Requests retried on another node before any token reached the client.",
            registry=registry,
        )
        self.cache = Counter(
            "sluice_scheduler_cache_lookups",
            "Cache lookups from the request path by result (hit, miss, error, skipped).",
            ["result"],
            registry=registry,
        )
        self.ttft = Histogram(
            "sluice_scheduler_time_to_first_token_seconds",
            "Time from request arrival to the first chunk sent to the client.",
            ["workload_class"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=registry,
        )
        self.nodes = Gauge(
            "sluice_scheduler_nodes",
            "Nodes known to this scheduler, by whether they can take work.",
            ["state"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "sluice_scheduler_in_flight_requests",
            "Requests this scheduler has in flight on nodes.",
            registry=registry,
        )
