"""Sluice / Serving: queues and admission, tenants, nodes, routing (circuits, ejections),
the response cache and GPUs."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import stat
from sluice_panels import (
    RI,
    Panel,
    graph,
    new_board,
    row,
    sized,
    states,
    thresholds,
    with_targets,
)


def queue_panels() -> list[Panel]:
    """Queue depth and wait by class, admission decisions, outcomes, quotas."""
    wait = "sluice_scheduler_queue_wait_seconds_bucket"
    return [
        graph(
            "Queue depth by class",
            "short",
            [("sum by (workload_class) (sluice_scheduler_queue_depth)", "{{workload_class}}")],
            description="Requests waiting in the schedulers (all replicas). Alert above 1,000.",
        ).thresholds(thresholds((None, "green"), (1000, "red"))),
        graph(
            "Queue wait by class",
            "s",
            [
                (
                    f"histogram_quantile(0.5, sum by (workload_class, le) (rate({wait}[{RI}])))",
                    "p50 {{workload_class}}",
                ),
                (
                    f"histogram_quantile(0.99, sum by (workload_class, le) (rate({wait}[{RI}])))",
                    "p99 {{workload_class}}",
                ),
            ],
            description="Admission to dispatch.",
        ),
        graph(
            "Admission decisions by reason",
            "reqps",
            [
                (
                    "sum by (workload_class, decision, reason) "
                    f"(rate(sluice_scheduler_admission_decisions_total[{RI}]))",
                    "{{workload_class}} {{decision}} {{reason}}",
                )
            ],
        ),
        graph(
            "Requests by outcome",
            "reqps",
            [
                (
                    "sum by (kind, workload_class, outcome) "
                    f"(rate(sluice_scheduler_requests_total[{RI}]))",
                    "{{kind}} {{workload_class}} {{outcome}}",
                )
            ],
            stacked=True,
        ),
        graph(
            "Quota checks by result",
            "reqps",
            [(f"sum by (result) (rate(sluice_scheduler_quota_checks_total[{RI}]))", "{{result}}")],
            width=16,
        ),
        with_targets(
            sized(stat.Panel(), "Redis reachable", "1 reachable, 0 not (lowest replica).", 8),
            [
                ("min(sluice_scheduler_quota_backend_up)", "quotas"),
                ("min(sluice_cache_redis_available)", "response cache"),
            ],
        ),
    ]


def tenant_panels() -> list[Panel]:
    """Tenants' token shares and requests, queued requests and waits."""
    tokens = "sluice_scheduler_tenant_tokens_total"
    return [
        graph(
            "Tenant token shares",
            "percentunit",
            [
                (
                    f"sum by (tenant) (rate({tokens}[{RI}])) / scalar(sum(rate({tokens}[{RI}])))",
                    "{{tenant}}",
                )
            ],
            description="Each tenant's share of the tokens (prompt and generated) through "
            "the schedulers: what fair queuing divides.",
            width=6,
            stacked=True,
        ),
        graph(
            "Requests by tenant",
            "reqps",
            [
                (
                    f"sum by (tenant) (rate(sluice_scheduler_tenant_requests_total[{RI}]))",
                    "{{tenant}}",
                )
            ],
            description="Requests of each tenant reaching the schedulers, refused ones included.",
            width=6,
        ),
        graph(
            "Queued requests by tenant",
            "short",
            [
                (
                    "sum by (tenant, workload_class) (sluice_scheduler_queue_depth)",
                    "{{tenant}} {{workload_class}}",
                )
            ],
            width=6,
        ),
        graph(
            "Queue wait p99 by tenant",
            "s",
            [
                (
                    "histogram_quantile(0.99, sum by (tenant, le) "
                    f"(rate(sluice_scheduler_queue_wait_seconds_bucket[{RI}])))",
                    "{{tenant}}",
                )
            ],
            width=6,
        ),
    ]


def node_panels() -> list[Panel]:
    """Running and waiting sequences, KV use, tokens per second, step time, memory."""
    return [
        graph(
            "Running sequences",
            "short",
            [
                (
                    "sum by (instance, workload_class) (sluice_node_running_sequences)",
                    "{{instance}} {{workload_class}}",
                ),
                (
                    "sum by (instance, workload_class) (sluice_node_waiting_sequences)",
                    "waiting {{instance}} {{workload_class}}",
                ),
            ],
            width=8,
        ),
        graph(
            "KV cache use",
            "percentunit",
            [
                (
                    "sum by (instance) (sluice_node_kv_cache_used_bytes) / "
                    "sum by (instance) (sluice_node_kv_cache_budget_bytes)",
                    "{{instance}}",
                )
            ],
            width=8,
        ),
        graph(
            "Tokens per second",
            "short",
            [
                ("sum by (instance) (sluice_node_decode_tokens_per_second)", "decode {{instance}}"),
                (
                    f"sum by (instance) (rate(sluice_node_generated_tokens_total[{RI}]))",
                    "generated {{instance}}",
                ),
                (
                    f"sum by (instance) (rate(sluice_node_prompt_tokens_total[{RI}]))",
                    "prompt {{instance}}",
                ),
            ],
            width=8,
        ),
        graph(
            "Step time by model",
            "s",
            [
                (
                    f"histogram_quantile({q}, sum by (model, le) "
                    f"(rate(sluice_node_step_seconds_bucket[{RI}])))",
                    f"p{round(q * 100)} {{{{model}}}}",
                )
                for q in (0.5, 0.99)
            ],
            description="Duration of the engines' steps that decoded (prefill chunks riding "
            "along included), all nodes serving the model.",
            width=8,
        ),
        graph(
            "Requests finished by reason",
            "reqps",
            [
                (
                    f"sum by (instance, finish_reason) (rate(sluice_node_requests_total[{RI}]))",
                    "{{instance}} {{finish_reason}}",
                )
            ],
            width=8,
        ),
        graph(
            "Node memory",
            "bytes",
            [
                (
                    "sum by (instance) (sluice_node_process_resident_memory_bytes)",
                    "RSS {{instance}}",
                ),
                ("sum by (instance) (sluice_node_adapter_bytes)", "adapters {{instance}}"),
                (
                    "sum by (instance) (sluice_node_adapter_budget_bytes)",
                    "adapter budget {{instance}}",
                ),
            ],
            width=8,
        ),
    ]


def routing_panels() -> list[Panel]:
    """Circuit and ejection states, load scores, dispatches, retries."""
    return [
        states(
            "Circuit state by node",
            "The worst state any scheduler holds for the node.",
            "max by (node) (sluice_scheduler_node_circuit_state)",
            "{{node}}",
            {"0": ("closed", "green"), "1": ("half-open", "yellow"), "2": ("open", "red")},
        ),
        states(
            "Ejected as a latency outlier",
            "TTFT or inter-token time far above the node's peers.",
            "max by (node) (sluice_scheduler_node_ejected)",
            "{{node}}",
            {"0": ("in rotation", "green"), "1": ("ejected", "orange")},
        ),
        graph(
            "Dispatches by node and result",
            "reqps",
            [
                (
                    f"sum by (node, result) (rate(sluice_scheduler_dispatches_total[{RI}]))",
                    "{{node}} {{result}}",
                )
            ],
            width=8,
        ),
        graph(
            "Load score by node",
            "short",
            [("max by (node) (sluice_scheduler_node_load_score)", "{{node}}")],
            width=8,
        ),
        graph(
            "Nodes and requests in flight",
            "short",
            [
                ("max by (state) (sluice_scheduler_nodes)", "nodes {{state}}"),
                ("sum(sluice_scheduler_in_flight_requests)", "in flight"),
            ],
            width=8,
        ),
        graph(
            "Retries and ejections",
            "short",
            [
                (
                    f"sum by (node) (rate(sluice_scheduler_retries_total[{RI}]))",
                    "retried away from {{node}}",
                ),
                (f"sum(rate(sluice_scheduler_retries_denied_total[{RI}]))", "retries denied"),
                (
                    f"sum by (node, signal) (rate(sluice_scheduler_outlier_ejections_total[{RI}]))",
                    "ejected {{node}} ({{signal}})",
                ),
            ],
            description="Per second: requests retried on another node after this one failed "
            "before the first token; retries the budget refused; ejections.",
            width=24,
        ),
    ]


def cache_panels() -> list[Panel]:
    """Hit ratio by level, lookups and stores."""
    return [
        graph(
            "Cache hit ratio by level",
            "percentunit",
            [
                (
                    f'sum(rate(sluice_scheduler_cache_lookups_total{{result="hit"}}[{RI}])) / '
                    f"sum(rate(sluice_scheduler_cache_lookups_total[{RI}]))",
                    "request path (all lookups)",
                ),
                (
                    f'sum(rate(sluice_cache_lookups_total{{result="hit"}}[{RI}])) / '
                    f'sum(rate(sluice_cache_lookups_total{{result!="uncacheable"}}[{RI}]))',
                    "cache service (cacheable lookups)",
                ),
            ],
            description="The schedulers keep no in-process cache: the levels are the request "
            "path (skipped and errors count as misses) and the cache service over Redis.",
        ),
        graph(
            "Cache lookups and stores",
            "reqps",
            [
                (
                    f"sum by (result) (rate(sluice_scheduler_cache_lookups_total[{RI}]))",
                    "scheduler {{result}}",
                ),
                (f"sum by (result) (rate(sluice_cache_lookups_total[{RI}]))", "cache {{result}}"),
                (f"sum by (result) (rate(sluice_cache_stores_total[{RI}]))", "store {{result}}"),
            ],
        ),
    ]


def gpu_panels() -> list[Panel]:
    """GPU utilisation and memory, from the nodes (CUDA, NVML) and from DCGM."""
    return [
        graph(
            "GPU utilisation",
            "percentunit",
            [
                ("sluice_node_gpu_utilization_ratio >= 0", "{{instance}} (NVML)"),
                ("DCGM_FI_DEV_GPU_UTIL / 100", "{{Hostname}} GPU {{gpu}} (DCGM)"),
            ],
            description="Empty on CPU nodes; the node reports -1 without NVML (left out).",
        ),
        graph(
            "GPU memory used",
            "percentunit",
            [
                (
                    "1 - sluice_node_gpu_free_bytes / sluice_node_gpu_total_bytes",
                    "{{instance}} (CUDA)",
                ),
                (
                    "DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)",
                    "{{Hostname}} GPU {{gpu}} (DCGM)",
                ),
            ],
            description="The GPU memory alerts fire below 10 % free for 5 minutes.",
        ).thresholds(thresholds((None, "green"), (0.9, "red"))),
    ]


def serving() -> Any:
    """Sluice / Serving."""
    board = new_board(
        "sluice-serving",
        "Sluice / Serving",
        "Queues, admission, tenants, nodes, routing, the response cache and GPUs.",
    )
    board = row(board, "Queues and admission", queue_panels())
    board = row(board, "Tenants", tenant_panels())
    board = row(board, "Nodes", node_panels())
    board = row(board, "Routing: circuits and ejections", routing_panels())
    board = row(board, "Response cache", cache_panels())
    return row(board, "GPUs", gpu_panels())
