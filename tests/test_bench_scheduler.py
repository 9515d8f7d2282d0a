"""The scheduler benchmark (``python -m bench.scheduler``): its pure statistics helpers, and a
smoke test of the real suite (etcd, Redis, a tiny-model node, a scheduler, all child processes)
through every phase with tiny counts and short windows. The timings mean nothing there; the
plumbing and the JSON shape other tools read do."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.scheduler.isolation import merge_rounds
from bench.scheduler.isolation_model import FLOODER, VICTIM, ModelNode, Run
from bench.scheduler.load import poisson_arrivals
from bench.scheduler.report import (
    isolation_ratio,
    node_removals,
    open_loop_summary,
    percentile_with_failures,
    targets,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ("overhead_ttft_p50_s", "refusal_p99_s", "fairness_jain", "share_ratio_a_to_b")
ISOLATION_PHASES = ("calm", "flood")
REFUSAL_KINDS = ("quota_idle", "quota_saturated", "deadline_saturated")


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def test_poisson_arrivals_repeat_for_a_seed_and_average_the_rate() -> None:
    """The same seed gives the same arrivals, sorted inside the duration, about rate x
    duration of them; another seed gives others; no rate, no arrivals."""
    first = poisson_arrivals(50.0, 100.0, random.Random("1:victim"))
    assert first == poisson_arrivals(50.0, 100.0, random.Random("1:victim"))
    assert first != poisson_arrivals(50.0, 100.0, random.Random("2:victim"))
    assert first == sorted(first)
    assert first[0] > 0
    assert first[-1] < 100.0
    assert abs(len(first) - 5000) < 5 * math.sqrt(5000)
    gaps = [b - a for a, b in itertools.pairwise(first)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.05)
    assert poisson_arrivals(0.0, 100.0, random.Random(1)) == []


def test_percentile_with_failures_counts_them_infinitely_late() -> None:
    """Failures rank above every value: one in 100 leaves p99 finite, two make it infinite."""
    values = [float(i) for i in range(1, 100)]
    assert percentile_with_failures(values, 0, 99) == 99.0
    assert percentile_with_failures(values, 1, 99) == 99.0
    assert percentile_with_failures(values, 2, 99) == math.inf
    assert percentile_with_failures(values[:1], 0, 50) == 1.0
    assert math.isnan(percentile_with_failures([], 0, 99))


def test_isolation_ratio_is_flood_over_calm_and_nan_without_a_calm_figure() -> None:
    """flood / calm; infinite when the flood p99 is; NaN when calm has no positive finite p99."""
    assert isolation_ratio(0.1, 0.12) == pytest.approx(1.2)
    assert isolation_ratio(0.1, math.inf) == math.inf
    assert math.isnan(isolation_ratio(math.inf, 0.1))
    assert math.isnan(isolation_ratio(math.nan, 0.1))
    assert math.isnan(isolation_ratio(0.0, 0.1))


def test_open_loop_summary_counts_arrivals_without_a_first_token_as_failures() -> None:
    """Sent minus first tokens are the failures; they enter the p99 counting failures but not
    the p99 of the served; rates are per second of the window."""
    tenant = {
        "rate_per_s": 2.0,
        "sent": 20,
        "not_sent": 0,
        "not_sent_all_phase": 0,
        "ttft_s": [0.01 * i for i in range(1, 19)],
        "arrival_s": [float(i) for i in range(18)],
        "launch_lag_s": [0.001] * 20,
        "outcomes": {"ok": 18, "refused RESOURCE_EXHAUSTED/OVERLOADED": 2},
    }
    summary = open_loop_summary(tenant, 10.0)
    assert summary["sent_per_s"] == 2.0
    assert summary["served_per_s"] == 1.8
    assert summary["no_first_token"] == 2
    assert summary["ttft_p99_s"] == pytest.approx(0.18)
    assert summary["ttft_p99_counting_failures_s"] == math.inf
    assert summary["outcomes"]["refused RESOURCE_EXHAUSTED/OVERLOADED"] == 2


def test_merge_rounds_pools_a_phase_s_blocks() -> None:
    """Counts and outcomes add up, samples are pooled, so percentiles run over every block."""
    blocks = [
        {
            "rate_per_s": 2.0,
            "sent": n,
            "not_sent": 1,
            "not_sent_all_phase": 2,
            "ttft_s": [0.01 * (i + 1)] * n,
            "arrival_s": [float(j) for j in range(n)],
            "launch_lag_s": [0.001] * n,
            "outcomes": {"ok": n - 1, "refused RESOURCE_EXHAUSTED/OVERLOADED": 1},
        }
        for i, n in enumerate((3, 5))
    ]
    merged = merge_rounds(blocks, 10.0)
    assert (merged["sent"], merged["not_sent"], merged["not_sent_all_phase"]) == (8, 2, 4)
    assert merged["ttft_s"] == [0.01] * 3 + [0.02] * 5
    assert merged["arrival_s"] == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0, 14.0]  # one timeline
    assert len(merged["launch_lag_s"]) == 8
    assert merged["outcomes"] == {"ok": 6, "refused RESOURCE_EXHAUSTED/OVERLOADED": 2}
    assert merged["rate_per_s"] == 2.0
    assert blocks[0]["ttft_s"] == [0.01] * 3  # the blocks themselves are left as they were
    assert open_loop_summary(merged, 4.0)["sent_per_s"] == 2.0


def test_node_removals_lists_when_the_scheduler_dropped_a_node(tmp_path: Path) -> None:
    """Only ``node_removed`` events count, by timestamp; lines that are not JSON are skipped."""
    log = tmp_path / "scheduler.log"
    events = [
        {"event": "node_added", "timestamp": "2026-01-01T00:00:00Z"},
        {"event": "node_removed", "timestamp": "2026-01-01T00:00:05Z"},
        {"event": "rpc_finished", "timestamp": "2026-01-01T00:00:06Z"},
    ]
    log.write_text("\n".join([*map(json.dumps, events), "not json"]) + "\n")
    assert node_removals(log) == ["2026-01-01T00:00:05Z"]


def test_isolation_target_passes_at_most_1_2() -> None:
    """The isolation row: a ratio of 1.2 passes, above it or NaN fails."""
    base = {
        "overhead_ttft_p50_s": 0.001,
        "refusal_p99_s": 0.001,
        "share_ratio_a_to_b": 2.0,
        "fairness_jain": 1.0,
    }
    for ratio, verdict in ((1.2, True), (1.21, False), (math.nan, False), (math.inf, False)):
        rows = targets({**base, "isolation_ttft_p99_ratio": ratio}, 2.0)
        row = next(r for r in rows if "flood / calm" in r["target"])
        assert row["pass"] is verdict, ratio
        assert row["limit"] == "<= 1.2"


@pytest.mark.timeout(240)
def test_scheduler_benchmark_end_to_end(tmp_path: Path) -> None:
    """One short run writes scheduler.json with the four headline figures as finite floats,
    the isolation ratio (a float, or null when the victim got no finite p99), a verdict per
    target, TTFTs of the four paths, refusals of each kind that all carry RetryInfo (and show
    in this run's scheduler log), output tokens for both fairness tenants without errors, both
    isolation phases with victim and flooder arrivals; and the report."""
    out_dir = tmp_path / "results"
    # 3 s of isolation: calm's flooder, at a quarter of capacity, sends a few requests per
    # block (over 1.5 s it once sent none, 2026-12-06, when capacity measured low).
    cmd = [
        sys.executable, "-m", "bench.scheduler",
        "--out-dir", str(out_dir), "--run-dir", str(tmp_path / "run"),
        "--overhead-requests", "3", "--quota-probes", "3",
        "--warmup-s", "0.5", "--window-s", "1.5",
        "--isolation-window-s", "3", "--isolation-rounds", "2", "--capacity-window-s", "1",
        "--isolation-settle-s", "0.2",
        "--isolation-deadline-s", "5",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=230, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = json.loads((out_dir / "scheduler.json").read_text(encoding="utf-8"))
    for key in HEADLINE:
        assert _finite(report[key]), (key, report[key])
    assert len(report["targets"]) == 5
    assert all(isinstance(t["pass"], bool) for t in report["targets"])

    ttft = report["overhead"]["ttft_s"]
    assert set(ttft) == {"node", "scheduler", "scheduler_quota", "passthrough"}
    assert all(0 < v["p50"] <= v["p99"] for v in ttft.values())

    for kind in REFUSAL_KINDS:
        refused = report["refusals"][kind]
        assert refused["refusals"] >= 1, (kind, refused)
        assert refused["without_retry_info"] == 0, kind
        assert 0 < refused["p50_s"] <= refused["p99_s"], kind
    assert report["refusals"]["quota_idle"]["refusals"] == 3
    for kind in ("floor_idle", "floor_saturated"):  # the bare-gRPC baseline, same phases
        floor = report["refusals"][kind]
        assert floor["refusals"] >= 1 and floor["not_refused"] == {}, (kind, floor)
        assert floor["without_retry_info"] == 0, kind
    assert report["refusals"]["floor_idle"]["refusals"] == 3
    server = report["refusals"]["server_side"]
    assert server["quota_idle"]["count"] == 3  # this run's log lines only
    assert all(server[kind]["count"] >= 1 for kind in REFUSAL_KINDS)

    fairness = report["fairness"]
    for tenant in ("tenant-a", "tenant-b"):
        assert fairness["tenants"][tenant]["tokens"] > 0, tenant
        assert fairness["tenants"][tenant]["errors"] == {}, tenant
        assert fairness["tenants"][tenant]["refused"] >= 0, tenant
    assert 0 < report["fairness_jain"] <= 1

    ratio = report["isolation_ttft_p99_ratio"]
    assert ratio is None or _finite(ratio), ratio
    assert isinstance(report["setup"]["node_removed_at"], list)
    assert all(_finite(v) and v > 0 for v in report["setup"]["cpu_loop_s_start_end"])
    isolation = report["isolation"]
    assert isolation["capacity_req_per_s"] > 0
    assert isolation["flood_rate_per_s"] > isolation["phases"]["calm"]["flooder"]["rate_per_s"]
    for phase in ISOLATION_PHASES:
        for tenant in ("victim", "flooder"):
            got = isolation["phases"][phase][tenant]
            assert got["sent"] == sum(got["outcomes"].values()), (phase, tenant, got)
        assert isolation["phases"][phase]["flooder"]["sent"] > 0, phase

    assert (out_dir / "scheduler.md").read_text(encoding="utf-8").startswith("# Scheduler bench")
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout


def _model_flood(policy: str, seed: int = 3) -> Run:
    node = ModelNode()
    capacity = node.capacity(256)
    rates = {VICTIM: 0.25 * capacity, FLOODER: 5 * capacity}
    return Run(node, rates, seed=seed, tokens=256, policy=policy, flood_queue=8).run(3.0, 120.0)


def test_isolation_model_replays_a_seed() -> None:
    """The discrete-event model of the isolation phase gives the same victim times for the
    same seed, and about 1.8 victim requests a second."""
    first, again = _model_flood("demand"), _model_flood("demand")
    assert first.ttft[VICTIM] == again.ttft[VICTIM] and len(first.ttft[VICTIM]) > 150


def test_isolation_model_flood_keeps_its_share_of_the_node() -> None:
    """In the modelled flood the flooder still completes about half the node's requests."""
    run = _model_flood("demand")
    assert run.completed[FLOODER] / 120.0 > 0.4 * run.node.capacity(256)
