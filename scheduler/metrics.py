"""Scheduler metrics (injected registry, bounded labels: classes, configured tenants, nodes)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.runtime.telemetry import RPC_LATENCY_BUCKETS

INTER_TOKEN_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
"""Seconds; 0.25 is the REALTIME time-per-output-token objective of the overload benchmark."""

QUEUE_WAIT_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True)
class NodeGaugeRow:
    """One node's state at scrape time."""

    node: str
    circuit: str
    ejected: bool
    load_score: float
    sequences: int = 0
    """Sequences on the node as this replica estimates them (its own plus the reports')."""
    tokens_in_flight: float = 0.0
    """Weighted tokens of work the node has not done yet (its last report plus those sent
    since)."""


@dataclass(frozen=True)
class LiveState:
    """Read at scrape time, so removed nodes and emptied queues leave no stale series."""

    queue_depths: Callable[[], dict[tuple[str, str], int]]
    """(class, tenant) → queued requests."""
    nodes: Callable[[], Iterable[NodeGaugeRow]]


LIVE_GAUGES = (
    "sluice_scheduler_queue_depth",
    "sluice_scheduler_node_circuit_state",
    "sluice_scheduler_node_ejected",
    "sluice_scheduler_node_load_score",
    "sluice_scheduler_node_sequences",
    "sluice_scheduler_node_tokens_in_flight",
)
"""The gauges :class:`_LiveCollector` yields."""


class _LiveCollector(Collector):
    def __init__(self, state: LiveState) -> None:
        self._state = state

    def describe(self) -> Iterator[Metric]:
        """The gauges' names, so the registry knows them when it registers this collector:
        without them a scrape that names its samples (``/metrics?name[]=...``, as ``make
        bench-slo``'s sampler asks) gets none of these gauges."""
        for name in LIVE_GAUGES:
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "sluice_scheduler_queue_depth",
            "Requests waiting in this replica's queues, by class and tenant.",
            labels=["workload_class", "tenant"],
        )
        for (cls, tenant), n in sorted(self._state.queue_depths().items()):
            depth.add_metric([cls, tenant], n)
        yield depth
        circuit = GaugeMetricFamily(
            "sluice_scheduler_node_circuit_state",
            "Circuit breaker per node: 0 closed, 1 half-open, 2 open.",
            labels=["node"],
        )
        ejected = GaugeMetricFamily(
            "sluice_scheduler_node_ejected",
            "1 while a node is ejected as a latency outlier.",
            labels=["node"],
        )
        score = GaugeMetricFamily(
            "sluice_scheduler_node_load_score",
            "Load score the router uses (estimated sequences / capacity + KV use).",
            labels=["node"],
        )
        sequences = GaugeMetricFamily(
            "sluice_scheduler_node_sequences",
            "Sequences on a node as this replica estimates them (its own plus the node's reports).",
            labels=["node"],
        )
        tokens = GaugeMetricFamily(
            "sluice_scheduler_node_tokens_in_flight",
            "Weighted tokens of work a node has not done yet (its last report plus what this "
            "replica sent since).",
            labels=["node"],
        )
        for row in self._state.nodes():
            circuit.add_metric([row.node], CIRCUIT_VALUES.get(row.circuit, 0))
            ejected.add_metric([row.node], int(row.ejected))
            score.add_metric([row.node], row.load_score)
            sequences.add_metric([row.node], row.sequences)
            tokens.add_metric([row.node], row.tokens_in_flight)
        yield from (circuit, ejected, score, sequences, tokens)


class SchedulerMetrics:
    """Everything the scheduler records."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._add_request_metrics(registry)
        self._add_node_metrics(registry)
        self._add_quota_and_config_metrics(registry)

    def _add_request_metrics(self, registry: CollectorRegistry) -> None:
        """Requests, admission, the queue, the cache and time to first token."""
        self.requests = Counter(
            "sluice_scheduler_requests",
            "Requests by kind, workload class and outcome (ok, cached, refused, failed).",
            ["kind", "workload_class", "outcome"],
            registry=registry,
        )
        self.admission = Counter(
            "sluice_scheduler_admission_decisions",
            "Admission decisions (admitted, refused, shed) by class and reason.",
            ["workload_class", "decision", "reason"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sluice_scheduler_queue_wait_seconds",
            "Time from admission to dispatch, by class and tenant.",
            ["workload_class", "tenant"],
            buckets=QUEUE_WAIT_BUCKETS,
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

    def _add_node_metrics(self, registry: CollectorRegistry) -> None:
        """Calls to nodes: dispatches, retries, in flight, the fleet and ejections."""
        self.predicted_wait = Histogram(
            "sluice_scheduler_predicted_queue_wait_seconds",
            "Queue wait admission predicted for each request it decided on, by class (refused "
            "ones included: the signal of a fleet short of capacity).",
            ["workload_class"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "sluice_scheduler_inter_token_seconds",
            "Time per output token of streamed generations, one sample per chunk after the "
            "first: the gap since the previous chunk over its tokens (paced job lines left out).",
            ["workload_class"],
            buckets=INTER_TOKEN_BUCKETS,
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
            "Requests retried on another node after this node failed before any token.",
            ["node"],
            registry=registry,
        )
        self.retries_denied = Counter(
            "sluice_scheduler_retries_denied",
            "Retries not made because the retry budget was spent.",
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
        self.outlier_ejections = Counter(
            "sluice_scheduler_outlier_ejections",
            "Nodes ejected for time-to-first-token or inter-token latency far above peers.",
            ["node", "signal"],
            registry=registry,
        )

    def _add_quota_and_config_metrics(self, registry: CollectorRegistry) -> None:
        """Quota checks, the quota store, and live tenant configuration."""
        self.quota_checks = Counter(
            "sluice_scheduler_quota_checks",
            "Quota checks by result (ok, exceeded, exceeded_cached: refused from a recent "
            "Redis answer, fail_open, fail_closed).",
            ["result"],
            registry=registry,
        )
        self.quota_backend_up = Gauge(
            "sluice_scheduler_quota_backend_up",
            "1 when the last quota check reached Redis, 0 when it failed.",
            registry=registry,
        )
        self.tenant_reloads = Counter(
            "sluice_scheduler_tenant_config_reloads",
            "Live tenant configuration changes from etcd, by result (applied, invalid, removed).",
            ["result"],
            registry=registry,
        )
        self.tenant_config_rejected = Counter(
            "sluice_scheduler_tenant_config_rejected",
            "Tenants documents from etcd refused (the last good one kept), by reason (too_large, "
            "encoding, syntax, alias, too_deep, duplicate_key, invalid_field, duplicate_name, "
            "duplicate_key_hash).",
            ["reason"],
            registry=registry,
        )

    def bind(self, state: LiveState) -> None:
        """Register the gauges read from live state at scrape time."""
        self._registry.register(_LiveCollector(state))
