"""Sluice / Overview: the seed article's four panels (requests by endpoint, resources
against request volume, error types, SLA attainment) and the service level objectives
(availability, REALTIME time to first token, REALTIME inter-token time)."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import gauge, heatmap, piechart
from sluice_panels import (
    FAULTS,
    ITL,
    PUBLIC,
    RI,
    TTFT,
    Panel,
    axis,
    graph,
    new_board,
    right_axis,
    row,
    sized,
    thresholds,
    with_targets,
)

REQUESTS = f"sum(rate(sluice_scheduler_requests_total[{RI}]))"
"""Requests reaching the schedulers, per second: the volume resources are compared with."""


def traffic_panels() -> list[Panel]:
    """The seed's request heatmap by endpoint (plus public latency) and resource use."""
    calls = sized(
        heatmap.Panel(), "Requests by endpoint", "Calls per second to each gRPC method.", 12, 9
    ).calculate(False)
    calls = with_targets(
        calls, [(f"sum by (method) (rate(sluice_rpc_requests_total[{RI}]))", "{{method}}")]
    )
    latency = sized(
        heatmap.Panel(),
        "Public call latency",
        "Durations of Inference and Jobs calls (start to final status), by bucket.",
        12,
        9,
    ).calculate(False)
    latency = with_targets(
        latency,
        [(f"sum by (le) (rate(sluice_rpc_duration_seconds_bucket{{{PUBLIC}}}[{RI}]))", "{{le}}")],
        fmt="heatmap",
    )
    resources = graph(
        "Resource use against request volume",
        "short",
        [
            (f"sum by (job) (rate(process_cpu_seconds_total[{RI}]))", "CPU cores {{job}}"),
            (
                # The node's own RSS gauge stands in where a job has no process_* series.
                "sum by (job) (process_resident_memory_bytes or on (job, instance) "
                "sluice_node_process_resident_memory_bytes)",
                "RSS {{job}}",
            ),
            (REQUESTS, "requests/s"),
        ],
        description="CPU (cores) and resident memory of each service, summed by scrape job "
        "(left), against requests reaching the schedulers (right).",
    )
    resources = axis(resources, "B", "bytes", "left")
    gpu = graph(
        "GPU use against request volume",
        "percentunit",
        [
            ("sluice_node_gpu_utilization_ratio >= 0", "{{instance}} (NVML)"),
            ("DCGM_FI_DEV_GPU_UTIL / 100", "{{Hostname}} GPU {{gpu}} (DCGM)"),
            (REQUESTS, "requests/s"),
        ],
        description="GPU utilisation from the nodes and from DCGM (left) against requests "
        "(right). Empty on CPU nodes.",
    )
    return [calls, latency, right_axis(resources, "C", "reqps"), right_axis(gpu, "C", "reqps")]


def error_panels() -> list[Panel]:
    """The seed's error types: status codes of public calls, and refusals by reason."""
    codes = sized(
        piechart.Panel(),
        "Error types",
        "Public calls that did not end OK, by status code, over the time range.",
        6,
        9,
    )
    codes = with_targets(
        codes,
        [
            (
                "sum by (code) (increase(sluice_rpc_requests_total"
                f'{{{PUBLIC},code!="OK"}}[$__range]))',
                "{{code}}",
            )
        ],
        fmt="instant",
    )
    refusals = sized(
        piechart.Panel(),
        "Refusals by reason",
        "Admission decisions other than admitted (refused, shed, cancelled), over the range.",
        6,
        9,
    )
    refusals = with_targets(
        refusals,
        [
            (
                "sum by (decision, reason) (increase(sluice_scheduler_admission_decisions_total"
                '{decision!="admitted"}[$__range]))',
                "{{decision}} {{reason}}",
            )
        ],
        fmt="instant",
    )
    return [codes, refusals]


def sla_panel() -> Panel:
    """The seed's SLA attainment gauge, for both objectives over the time range."""
    panel = (
        sized(
            gauge.Panel(),
            "SLA attainment",
            "Over the time range: REALTIME first tokens within 2 s (objective 99 %), and "
            "public calls without a server fault (objective 99.9 %).",
            12,
            9,
        )
        .unit("percentunit")
        .min(0.9)
        .max(1)
        .decimals(2)
        .thresholds(thresholds((None, "red"), (0.99, "orange"), (0.999, "green")))
    )
    ttft = (
        f'sum(increase({TTFT}_bucket{{workload_class="realtime",le="2.0"}}[$__range])) / '
        f'sum(increase({TTFT}_count{{workload_class="realtime"}}[$__range]))'
    )
    availability = (
        f"1 - ((sum(increase(sluice_rpc_requests_total{{{PUBLIC},{FAULTS}}}[$__range])) "
        f"or vector(0)) / sum(increase(sluice_rpc_requests_total{{{PUBLIC}}}[$__range])))"
    )
    return with_targets(
        panel, [(ttft, "REALTIME TTFT ≤ 2 s"), (availability, "availability")], fmt="instant"
    )


def inter_token_panels() -> list[Panel]:
    """Inter-token time by class, and its SLO's attainment over the time range."""
    quantiles = graph(
        "Inter-token time by class",
        "s",
        [
            (
                f"histogram_quantile({q}, sum by (workload_class, le) (rate({ITL}_bucket[{RI}])))",
                f"p{round(q * 100)} {{{{workload_class}}}}",
            )
            for q in (0.5, 0.99)
        ],
        description="Time per output token of streamed chunks (each chunk after a stream's "
        "first: the gap since the previous one over its tokens; job lines left out). "
        "REALTIME's objective: 99 % within 0.25 s.",
        width=16,
    ).thresholds(thresholds((None, "green"), (0.25, "red")))
    attainment = (
        sized(
            gauge.Panel(),
            "Inter-token SLO attainment",
            "Over the time range: REALTIME stream chunks within 0.25 s per token (objective 99 %).",
            8,
        )
        .unit("percentunit")
        .min(0.9)
        .max(1)
        .decimals(2)
        .thresholds(thresholds((None, "red"), (0.99, "green")))
    )
    within = (
        f'sum(increase({ITL}_bucket{{workload_class="realtime",le="0.25"}}[$__range])) / '
        f'sum(increase({ITL}_count{{workload_class="realtime"}}[$__range]))'
    )
    return [quantiles, with_targets(attainment, [(within, "REALTIME ≤ 0.25 s")], fmt="instant")]


def slo_panels() -> list[Panel]:
    """Burn rates of the three SLOs, time to first token and inter-token time by class,
    calls by status."""
    burn = graph(
        "Error budget burn rate (1 h window)",
        "none",
        [
            ("sluice:availability_errors:ratio_rate1h / 0.001", "availability"),
            ("sluice:realtime_ttft_slow:ratio_rate1h / 0.01", "REALTIME TTFT"),
            ("sluice:realtime_inter_token_slow:ratio_rate1h / 0.01", "REALTIME inter-token"),
        ],
        description="1: the budget lasts the 30 days. The fast-burn page needs 14.4 here and "
        "in the 5 m window, or 6 over 6 h and 30 m.",
    ).thresholds(thresholds((None, "green"), (6, "orange"), (14.4, "red")))
    p99 = graph(
        "P99 time to first token by class",
        "s",
        [
            (
                "histogram_quantile(0.99, sum by (workload_class, le) "
                f"(rate({TTFT}_bucket[{RI}])))",
                "{{workload_class}}",
            )
        ],
        description="The seed's latency alert fires above 500 ms for 3 minutes.",
    ).thresholds(thresholds((None, "green"), (0.5, "red")))
    codes = graph(
        "Public calls by status code",
        "reqps",
        [(f"sum by (code) (rate(sluice_rpc_requests_total{{{PUBLIC}}}[{RI}]))", "{{code}}")],
        width=24,
        stacked=True,
    )
    return [burn, p99, *inter_token_panels(), codes]


def overview() -> Any:
    """Sluice / Overview."""
    board = new_board(
        "sluice-overview",
        "Sluice / Overview",
        "The seed article's four panels (requests by endpoint, resources against volume, "
        "error types, SLA attainment) and Sluice's service level objectives.",
    )
    board = row(board, "Traffic and resources", traffic_panels())
    board = row(board, "Errors and SLA", [*error_panels(), sla_panel()])
    return row(board, "Service level objectives", slo_panels())
