"""Worker side of the engine benchmark: each job measures one thing inside its own process.

:func:`run_job` loads the model, warms the system up (untimed), serves the workload and returns
a JSON-able record (the driver adds roofline fractions). The ``aux`` job measures the matmul
roofline and then the mid-batch TTFT mode.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bench.engine.common import (
    HF_GENERATE_BATCH,
    HF_SEQUENTIAL,
    HF_STATIC,
    JOB_AUX,
    SLUICE,
    BenchRequest,
    CpuMeter,
    JobSpec,
    peak_rss_bytes,
)
from bench.engine.hf import run_hf_generate_batch, run_hf_sequential, run_hf_static
from bench.engine.model import load_model, model_facts, sync_device, workload_for
from bench.engine.sluice_engine import measure_midbatch, run_sluice
from bench.engine.teacher_forced import teacher_forced
from inference_node.models import LanguageModel

MATMUL_WARMUP_ITERATIONS = 3
MATMUL_SHAPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "cpu": ((2048, 2048, 2048), (256, 576, 1536)),
    "cuda": ((8192, 8192, 8192), (256, 576, 1536)),
}
RUNNERS: dict[str, Callable[[LanguageModel, Sequence[BenchRequest], JobSpec], dict[str, Any]]]
RUNNERS = {
    HF_SEQUENTIAL: run_hf_sequential,
    HF_STATIC: run_hf_static,
    HF_GENERATE_BATCH: run_hf_generate_batch,
    SLUICE: run_sluice,
}


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Run the job ``spec`` describes in this process and return its record."""
    torch.set_num_threads(spec.threads or os.cpu_count() or 1)
    if spec.kind == JOB_AUX:
        return _run_aux(spec)
    lm = load_model(spec)
    workload = workload_for(lm, spec)[: spec.requests]
    runner = RUNNERS[spec.system]
    record = runner(lm, workload, spec)
    record.update(model_facts(lm))
    record["peak_rss_bytes"] = peak_rss_bytes()
    return record


def _run_aux(spec: JobSpec) -> dict[str, Any]:
    device = torch.device(spec.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.dtype]
    record: dict[str, Any] = {
        "torch_version": torch.__version__,
        "transformers_version": importlib.metadata.version("transformers"),
        "threads": torch.get_num_threads(),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
    }
    meter = CpuMeter()
    record.update(measure_matmul(device, dtype, spec.matmul_seconds))
    record["matmul"]["other_cpu_fraction"] = meter.finish()["other_cpu_fraction"]
    lm: LanguageModel | None = None
    if spec.midbatch:
        try:
            lm = load_model(spec)
            record.update(measure_midbatch(lm, spec))
        except Exception as exc:  # the roofline is still worth reporting
            record["midbatch_error"] = f"{type(exc).__name__}: {exc}"
    if spec.dtype != "float32":  # the stated bf16 tolerance: flips on ties only
        try:
            lm = lm or load_model(spec)
            record["teacher_forced"] = teacher_forced(lm, workload_for(lm, spec))
        except Exception as exc:
            record["teacher_forced"] = {"error": f"{type(exc).__name__}: {exc}"}
    return record


def measure_matmul(device: torch.device, dtype: torch.dtype, seconds: float) -> dict[str, Any]:
    """Best ``torch.matmul`` GFLOP/s over a square and a model-shaped product."""
    shapes: list[dict[str, Any]] = []
    best = 0.0
    per_sync = 20 if device.type == "cuda" else 1
    for m, k, n in MATMUL_SHAPES.get(device.type, MATMUL_SHAPES["cpu"]):
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        c = torch.empty(m, n, dtype=dtype, device=device)
        for _ in range(MATMUL_WARMUP_ITERATIONS):
            torch.matmul(a, b, out=c)
        sync_device(device)
        iterations = 0
        started = time.perf_counter()
        while True:
            for _ in range(per_sync):
                torch.matmul(a, b, out=c)
            sync_device(device)
            iterations += per_sync
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        gflops = 2.0 * m * k * n * iterations / elapsed / 1e9
        shapes.append({"shape": [m, k, n], "gflops": gflops, "iterations": iterations})
        best = max(best, gflops)
        del a, b, c
    return {
        "matmul_gflops": best,
        "matmul": {"dtype": str(dtype).removeprefix("torch."), "shapes": shapes},
    }
