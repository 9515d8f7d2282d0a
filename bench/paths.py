"""Where the benchmarks find their scenarios and write their results, wherever they run from."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SCENARIOS_DIR = REPO_ROOT / "bench" / "scenarios"
SCRATCH_DIR = REPO_ROOT / ".sluice" / "bench"
"""Logs and run directories of benchmark runs (ignored by git)."""
