"""Node metrics: counters recorded on the request path, gauges read from the engine at scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from inference_node.engine.types import EngineStats
from inference_node.gpu import GpuProbe
from sluice.contract import WorkloadClass

EMBED_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Texts per forward: powers of two, as the batch sizer grows its limit."""


class NodeMetrics:
    """Counters of the node's request path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.generated_tokens = Counter(
            "sluice_node_generated_tokens",
            "Tokens generated, by model.",
            ["model"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "sluice_node_prompt_tokens",
            "Prompt tokens processed, by model.",
            ["model"],
            registry=registry,
        )
        self.requests = Counter(
            "sluice_node_requests",
            "Requests finished, by model and finish reason.",
            ["model", "finish_reason"],
            registry=registry,
        )
        self.embed_batch_size = Histogram(
            "sluice_node_embed_batch_size",
            "Texts in each forward of an embedding model (concurrent Embed calls merged).",
            ["model"],
            buckets=EMBED_BATCH_BUCKETS,
            registry=registry,
        )


YIELD_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
"""Seconds; fine around the default yield bound (50 ms) the p99 is held to."""


class TrainingMetrics:
    """Fine-tuning on the node's engine thread: progress, units and what they cost inference.
    Written from the engine thread (Prometheus clients are thread-safe)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens = Counter(
            "sluice_node_training_tokens",
            "Training tokens (prompts included) of finished optimizer steps, by model.",
            ["model"],
            registry=registry,
        )
        self.steps = Counter(
            "sluice_node_training_steps",
            "Optimizer steps finished, by model.",
            ["model"],
            registry=registry,
        )
        self.units = Counter(
            "sluice_node_training_units",
            "Training units run on the engine thread, by model and kind.",
            ["model", "kind"],
            registry=registry,
        )
        self.deferred = Counter(
            "sluice_node_training_units_deferred",
            "Times the next training unit was held back, by model and reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.yield_wait = Histogram(
            "sluice_node_training_yield_wait_seconds",
            "Time inference waited for a training unit: a request arriving during one waited "
            "to be admitted (wait=admission), running sequences' next token (wait=decode).",
            ["model", "wait"],
            buckets=YIELD_WAIT_BUCKETS,
            registry=registry,
        )
        self.checkpoints = Counter(
            "sluice_node_training_checkpoints",
            "Checkpoints made durable in the fleet's checkpoint store, by model.",
            ["model"],
            registry=registry,
        )

    def start_at_zero(self, models: Iterable[str]) -> None:
        """Give ``models`` their series at 0 now: a counter a dashboard or alert reads must
        exist before its first event (the first checkpoint can be minutes away)."""
        for model in models:
            for counter in (self.tokens, self.steps, self.checkpoints):
                counter.labels(model)


def _step_family(stats: dict[str, EngineStats]) -> HistogramMetricFamily:
    steps = HistogramMetricFamily(
        "sluice_node_step_seconds",
        "Duration of the engine's steps that decoded (prefill chunks riding along included).",
        labels=["model"],
    )
    for model, s in stats.items():
        if s.steps is not None:
            buckets = [(_le(bound), count) for bound, count in s.steps.buckets]
            steps.add_metric([model], buckets, s.steps.sum_s)
    return steps


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class EngineCollector(Collector):
    """Reads every engine's stats when Prometheus scrapes (no timer, nothing stale)."""

    def __init__(
        self, stats: Callable[[], dict[str, EngineStats]], gpu: GpuProbe | None = None
    ) -> None:
        self._stats = stats
        self._gpu = gpu
        self._process = psutil.Process()

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        running = GaugeMetricFamily(
            "sluice_node_running_sequences",
            "Sequences decoding.",
            labels=["model", "workload_class"],
        )
        waiting = GaugeMetricFamily(
            "sluice_node_waiting_sequences", "Sequences queued.", labels=["model", "workload_class"]
        )
        kv_used = GaugeMetricFamily(
            "sluice_node_kv_cache_used_bytes", "KV cache bytes in use.", labels=["model"]
        )
        kv_budget = GaugeMetricFamily(
            "sluice_node_kv_cache_budget_bytes", "KV cache bytes allowed.", labels=["model"]
        )
        rate = GaugeMetricFamily(
            "sluice_node_decode_tokens_per_second", "Decode throughput (EWMA).", labels=["model"]
        )
        adapters = GaugeMetricFamily(
            "sluice_node_adapter_bytes",
            "LoRA adapter bytes held (cache and the batch's stacks).",
            labels=["model"],
        )
        adapter_budget = GaugeMetricFamily(
            "sluice_node_adapter_budget_bytes",
            "LoRA adapter cache bytes allowed.",
            labels=["model"],
        )
        current = self._stats()
        for model, stats in current.items():
            for cls in WorkloadClass:
                running.add_metric([model, cls.label], stats.running.get(cls, 0))
                waiting.add_metric([model, cls.label], stats.waiting.get(cls, 0))
            kv_used.add_metric([model], stats.kv_used_bytes)
            kv_budget.add_metric([model], stats.kv_budget_bytes)
            rate.add_metric([model], stats.decode_tokens_per_s)
            adapters.add_metric([model], stats.adapter_bytes)
            adapter_budget.add_metric([model], stats.adapter_budget_bytes)
        rss = GaugeMetricFamily(
            "sluice_node_process_resident_memory_bytes", "Resident set size of the node process."
        )
        rss.add_metric([], self._process.memory_info().rss)
        yield from (running, waiting, kv_used, kv_budget, rate, adapters, adapter_budget, rss)
        yield _step_family(current)
        reading = self._gpu.read() if self._gpu is not None else None
        if reading is not None:
            free = GaugeMetricFamily("sluice_node_gpu_free_bytes", "Free GPU memory (CUDA).")
            free.add_metric([], reading.free_bytes)
            total = GaugeMetricFamily("sluice_node_gpu_total_bytes", "Total GPU memory (CUDA).")
            total.add_metric([], reading.total_bytes)
            util = GaugeMetricFamily(
                "sluice_node_gpu_utilization_ratio", "GPU utilisation from NVML, 0-1; -1 unknown."
            )
            util.add_metric(
                [], reading.utilization_percent / 100 if reading.utilization_percent >= 0 else -1
            )
            yield from (free, total, util)
