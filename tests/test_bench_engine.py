"""Smoke test of the engine benchmark (``python -m bench.engine``) on the tiny seeded Llama.

It runs the real harness end to end (driver plus one worker subprocess per system and
concurrency) on a small workload and checks the JSON schema other tools rely on.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS: dict[str, type] = {
    "system": str,
    "concurrency": int,
    "requests": int,
    "output_tokens_per_s": float,
    "ttft_p50_s": float,
    "ttft_p99_s": float,
    "peak_rss_bytes": int,
}
TOP_FLOATS = ("matmul_gflops", "midbatch_ttft_p99_s", "decode_step_s", "prefill_s")
EXPECTED_RUNS = {
    ("hf_sequential", 1): 4,
    ("sluice", 1): 4,
    ("sluice", 4): 8,
    ("hf_static", 4): 8,
    ("hf_generate_batch", 4): 8,
}


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.timeout(150)
def test_engine_benchmark_end_to_end(tmp_path: Path) -> None:
    out_dir = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "bench.engine",
        "--model",
        "tiny-random-llama",
        "--requests",
        "8",
        "--concurrency",
        "1,4",
        "--sequential-requests",
        "4",
        "--out-dir",
        str(out_dir),
        "--matmul-seconds",
        "0.2",
        "--midbatch-background-tokens",
        "24",
        "--midbatch-probes",
        "3",
        "--midbatch-start-timeout-s",
        "20",
        "--midbatch-probe-timeout-s",
        "10",
        "--worker-timeout-s",
        "100",
        # Two workers at a time: the timings are meaningless here, the plumbing is not.
        "--parallel-workers",
        "2",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=140, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = json.loads((out_dir / "engine.json").read_text(encoding="utf-8"))
    for key in TOP_FLOATS:
        assert isinstance(report[key], float) and math.isfinite(report[key]), key
    assert report["matmul_gflops"] > 0

    runs = report["runs"]
    seen = [(run["system"], run["concurrency"]) for run in runs]
    assert sorted(seen) == sorted(EXPECTED_RUNS), seen
    for run in runs:
        label = f"{run['system']}@{run['concurrency']}"
        for key, kind in RUN_KEYS.items():
            assert type(run[key]) is kind, (label, key, run[key])
            if kind is not str:
                assert _is_finite_number(run[key]), (label, key)
        assert run["requests"] == EXPECTED_RUNS[(run["system"], run["concurrency"])], label
        if run.get("error"):
            # transformers' own continuous batching may not run everywhere: then it is recorded.
            assert run["system"] == "hf_generate_batch", (label, run["error"])
            assert isinstance(run["error"], str)
            continue
        assert run["output_tokens_per_s"] > 0, label
        assert 0 < run["ttft_p50_s"] <= run["ttft_p99_s"], label
        assert run["peak_rss_bytes"] > 0, label
        assert _is_finite_number(run["roofline_fraction"]), label

    assert report["midbatch"]["ran"], report["midbatch"]
    assert report["prefill_s"] > 0
    assert {t["status"] for t in report["targets"]} <= {"PASS", "FAIL", "n/a"}
    assert (out_dir / "engine.md").read_text(encoding="utf-8").startswith("# Engine benchmark")
    assert (out_dir / "engine.png").read_bytes().startswith(b"\x89PNG")
    assert "targets:" in proc.stdout
