"""Metrics of the jobs subsystem (``sluice_scheduler_job*``), per replica.

Counters count what this replica did; the gauges of jobs by state and queue lag are read from
Redis at scrape time through the worker's last snapshot of the active jobs (every replica
reports the same cluster-wide view, so sum by replica with care: use ``max``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LINE_OUTCOMES = (
    "completed",
    "failed",
    "deferred",
    "reclaimed",
    "reattached",
    "regenerated",
    "dead_lettered",
    "duplicate",
    "skipped",
)


class JobMetrics:
    """The jobs subsystem's counters and histograms."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lines = Counter(
            "sluice_scheduler_job_lines_total",
            "Job lines this replica handled, by outcome: completed, failed, deferred (refused "
            "for overload, retried after RetryInfo), reclaimed (taken over from a dead worker), "
            "reattached (a reclaimed line whose node still generated it: not computed again), "
            "regenerated (a reclaimed line a node had started, generated again), dead_lettered, "
            "duplicate (computed twice, stored once), skipped (job cancelled or "
            "expired).",
            ["outcome"],
            registry=registry,
        )
        for outcome in LINE_OUTCOMES:
            self.lines.labels(outcome)
        self.jobs = Counter(
            "sluice_scheduler_jobs_finished_total",
            "Jobs this replica moved to a final state, by state.",
            ["state"],
            registry=registry,
        )
        self.submitted = Counter(
            "sluice_scheduler_jobs_submitted_total",
            "Job submissions, by result: accepted, duplicate (idempotency key), refused "
            "(window infeasible), invalid.",
            ["result"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "sluice_scheduler_job_lines_in_flight",
            "Job lines this replica runs or defers now.",
            registry=registry,
        )
        self.window = Gauge(
            "sluice_scheduler_job_line_window",
            "Lines this replica may keep in flight (adaptive).",
            registry=registry,
        )
        self.completion_error = Histogram(
            "sluice_scheduler_job_completion_error_ratio",
            "(actual - predicted) / predicted duration of completed jobs, the prediction made "
            "at submission.",
            buckets=(-0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0),
            registry=registry,
        )


class JobStateCollector(Collector):
    """Jobs by state and the queue lag per class and tenant, from the worker's snapshot:
    ``snapshot()`` returns ``[(state_label, class_label, tenant, age_seconds)]`` of the jobs
    not final."""

    def __init__(self, snapshot: Callable[[], list[tuple[str, str, str, float]]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = self._snapshot()
        by_state = GaugeMetricFamily(
            "sluice_scheduler_jobs", "Jobs not final, by state.", labels=["state"]
        )
        counts: dict[str, int] = {}
        lag: dict[tuple[str, str], float] = {}
        for state, cls, tenant, age in rows:
            counts[state] = counts.get(state, 0) + 1
            lag[(cls, tenant)] = max(lag.get((cls, tenant), 0.0), age)
        for state in ("queued", "running", "cancelling"):
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        lag_family = GaugeMetricFamily(
            "sluice_scheduler_job_queue_lag_seconds",
            "Age of the oldest job not final, per class and tenant.",
            labels=["workload_class", "tenant"],
        )
        for (cls, tenant), age in sorted(lag.items()):
            lag_family.add_metric([cls, tenant], age)
        yield lag_family


FINETUNE_MOVES = (
    "node_failed",
    "node_busy",
    "node_draining",
    "stalled",
    "taken_over",
    "node_unsuitable",
    "store_unavailable",
)


class FinetuneMetrics:
    """What this replica's fine-tune drivers did (``sluice_scheduler_finetune_*``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "sluice_scheduler_finetune_jobs_finished_total",
            "Fine-tune jobs this replica moved to a final state, by state.",
            ["state"],
            registry=registry,
        )
        for state in ("completed", "failed", "cancelled", "expired"):
            self.jobs.labels(state)
        self.steps = Counter(
            "sluice_scheduler_finetune_steps_total",
            "Optimizer steps of fine-tunes this replica drove, stored once each.",
            registry=registry,
        )
        self.tokens = Counter(
            "sluice_scheduler_finetune_tokens_total",
            "Training tokens of the steps counted in sluice_scheduler_finetune_steps_total.",
            registry=registry,
        )
        self.moves = Counter(
            "sluice_scheduler_finetune_moves_total",
            "Fine-tunes this replica moved off a node or took over, by reason: node_failed "
            "(stream broken or an error), node_busy (RESOURCE_EXHAUSTED), node_draining, "
            "stalled (no event within finetune_stall_seconds), taken_over (its replica died), "
            "node_unsuitable (cannot train it: not finetune, model, memory), store_unavailable "
            "(the checkpoint or adapter store could not be used there).",
            ["reason"],
            registry=registry,
        )
        for reason in FINETUNE_MOVES:
            self.moves.labels(reason)
        self.driving = Gauge(
            "sluice_scheduler_finetune_jobs_driven",
            "Fine-tune jobs this replica drives now, by phase: training (a Train call is "
            "open) or waiting (for a node).",
            ["phase"],
            registry=registry,
        )
        for phase in ("training", "waiting"):
            self.driving.labels(phase)
        self.states = Gauge(
            "sluice_scheduler_finetune_jobs",
            "Fine-tune jobs not final, cluster-wide as this replica last read them, by state.",
            ["state"],
            registry=registry,
        )
        for state in ("queued", "running", "cancelling"):
            self.states.labels(state)
