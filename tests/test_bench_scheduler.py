"""Smoke test of the scheduler benchmark (``python -m bench.scheduler``): the real suite (etcd,
Redis, a tiny-model node, a scheduler, all child processes) through every phase with tiny
counts and a short fairness window. The timings mean nothing here; the plumbing and the JSON
shape other tools read do."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ("overhead_ttft_p50_s", "refusal_p99_s", "fairness_jain", "share_ratio_a_to_b")
REFUSAL_KINDS = ("quota_idle", "quota_saturated", "deadline_saturated")


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@pytest.mark.timeout(150)
def test_scheduler_benchmark_end_to_end(tmp_path: Path) -> None:
    """One short run writes scheduler.json with the four headline figures as finite floats,
    a verdict per target, TTFTs of the four paths, refusals of each kind that all carry
    RetryInfo (and show in this run's scheduler log), output tokens for both fairness tenants
    without errors; and the report."""
    out_dir = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "bench.scheduler",
        "--out-dir", str(out_dir), "--run-dir", str(tmp_path / "run"),
        "--overhead-requests", "3", "--quota-probes", "3",
        "--warmup-s", "0.5", "--window-s", "1.5",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=140, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = json.loads((out_dir / "scheduler.json").read_text(encoding="utf-8"))
    for key in HEADLINE:
        assert _finite(report[key]), (key, report[key])
    assert len(report["targets"]) == 4
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
    server = report["refusals"]["server_side"]
    assert server["quota_idle"]["count"] == 3  # this run's log lines only
    assert all(server[kind]["count"] >= 1 for kind in REFUSAL_KINDS)

    fairness = report["fairness"]
    for tenant in ("tenant-a", "tenant-b"):
        assert fairness["tenants"][tenant]["tokens"] > 0, tenant
        assert fairness["tenants"][tenant]["errors"] == {}, tenant
    assert 0 < report["fairness_jain"] <= 1

    assert (out_dir / "scheduler.md").read_text(encoding="utf-8").startswith("# Scheduler bench")
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout
