"""Driver side of the engine benchmark: worker processes, machine facts, the report.

Kept free of torch imports so the driver never competes with its workers for memory or threads.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.engine.common import (
    HF_SEQUENTIAL,
    OUTPUT_LENGTHS,
    PROMPT_MAX_TOKENS,
    PROMPT_MIN_TOKENS,
    VLLM,
    JobSpec,
    cpu_sample,
)
from bench.engine.report import (
    add_roofline,
    compute_ratios,
    evaluate_targets,
    render_markdown,
    write_plot,
)
from bench.paths import REPO_ROOT

BUDGET_RESERVE_S = 15.0
MIN_JOB_SECONDS = 20.0
ERROR_TAIL_CHARS = 3000
QUIET_CPU_FRACTION = 0.15  # machine-wide busy share under which a worker may start
QUIET_SAMPLE_S = 1.0
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",  # no usage report thread (nor network attempt) in vllm workers
}


def worker_python(system: str, vllm_python: Path) -> str:
    """The interpreter a worker of ``system`` runs on: ``vllm_python`` for ``vllm`` (vLLM
    lives in its own virtualenv), this one for every other system and the aux job."""
    return str(vllm_python) if system == VLLM else sys.executable


def run_worker_process(
    spec: JobSpec, timeout_s: float, workdir: Path, python: str = sys.executable
) -> dict[str, Any]:
    """Run ``spec`` in a fresh ``<python> -m bench.engine --worker`` process and read its
    record. A worker that fails, crashes or times out gives ``{"error": ...}`` instead."""
    name = f"{spec.kind}-{spec.system or 'aux'}-{spec.concurrency}"
    out_path, log_path = workdir / f"{name}.json", workdir / f"{name}.log"
    cmd = [
        python,
        "-m",
        "bench.engine",
        "--worker",
        spec.to_json(),
        "--worker-out",
        str(out_path),
    ]
    env = {**os.environ, **WORKER_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with log_path.open("wb") as log:
        # Its own process group: vLLM's engine core is a child of the worker, and a worker
        # that times out (or a driver stopped) must not leave it running beside later jobs.
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        returncode: int | None = None
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log_tail = log_path.read_text(encoding="utf-8", errors="replace")[-ERROR_TAIL_CHARS:]
    record: dict[str, Any] = {}
    if out_path.is_file():
        with contextlib.suppress(ValueError):
            record = json.loads(out_path.read_text(encoding="utf-8"))
    if returncode is None:
        return {"error": f"worker timed out after {timeout_s:.0f} s", "error_detail": log_tail}
    if returncode != 0 or not record:
        error = record.get("error") or f"worker exited with status {returncode}"
        return {"error": error, "error_detail": record.get("traceback") or log_tail}
    return record


def machine_info() -> dict[str, Any]:
    """CPU model and count, package versions and the load average (torch-free)."""
    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("torch", "transformers"):
        try:
            versions[f"{package}_version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[f"{package}_version"] = "?"
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count() or 1,
        "python": platform.python_version(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        **versions,
    }


def _agreement(runs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """How many of request 0's leading greedy tokens each run shares with hf_sequential."""
    reference = next(
        (
            r.get("request0_head")
            for r in runs
            if r["system"] == HF_SEQUENTIAL and r.get("request0_head")
        ),
        None,
    )
    if not reference:
        return {}
    agreement = {}
    for run in runs:
        head = run.get("request0_head")
        if run["system"] == HF_SEQUENTIAL or not head:
            continue
        same = 0
        for mine, theirs in zip(head, reference, strict=False):
            if mine != theirs:
                break
            same += 1
        agreement[f"{run['system']}@{run['concurrency']}"] = f"{same}/{len(reference)}"
    return agreement


def build_report(
    args: argparse.Namespace,
    argv: Sequence[str],
    machine: dict[str, Any],
    aux: dict[str, Any],
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """Assemble the JSON report from the aux record and the run records."""
    measured = next((r for r in runs if not r.get("error")), {})
    for key in ("torch_version", "transformers_version", "device_name"):
        if key in aux:
            machine[key] = aux[key]
    vllm_run = next((r for r in runs if r["system"] == VLLM and "vllm_version" in r), {})
    for key in ("vllm_version", "vllm_torch_version"):
        if key in vllm_run:
            machine[key] = vllm_run[key]
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    midbatch_ran = "midbatch_ttft_p99_s" in aux and not aux.get("midbatch_error")
    midbatch: dict[str, Any] = {"ran": midbatch_ran}
    if midbatch_ran:
        midbatch.update(
            {
                k.removeprefix("midbatch_"): v
                for k, v in aux.items()
                if k.startswith("midbatch_") and not k.startswith("midbatch_ttft_p")
            }
        )
        midbatch["prefill_samples_s"] = aux.get("prefill_samples_s", [])
    else:
        midbatch["error"] = aux.get("midbatch_error") or aux.get("error") or "skipped"
    parameters = int(measured.get("parameter_count", 0))
    matmul_gflops = float(aux.get("matmul_gflops", 0.0))
    add_roofline(runs, matmul_gflops, parameters)
    report: dict[str, Any] = {
        "schema_version": 1,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.engine", *argv]),
        "machine": machine,
        "config": {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "seed": args.seed,
            "concurrency": args.concurrency,
            "baseline_concurrency": args.baseline_concurrency,
            "systems": args.systems,
            "vllm_python": str(args.vllm_python),
            "kv_budget_bytes": args.kv_budget_bytes,
            "max_batched_tokens": args.max_batched_tokens,
            "parallel_workers": args.parallel_workers,
        },
        "workload": {
            "seed": args.seed,
            "requests": args.requests,
            "sequential_requests": min(args.sequential_requests, args.requests),
            "prompt_tokens_min": PROMPT_MIN_TOKENS,
            "prompt_tokens_max": PROMPT_MAX_TOKENS,
            "max_new_tokens_choices": list(OUTPUT_LENGTHS),
        },
        "threads": aux.get("threads", measured.get("threads")),
        "matmul_gflops": matmul_gflops,
        "matmul": aux.get("matmul", {"error": aux.get("error", "not measured")}),
        "parameter_count": parameters,
        "weight_bytes": int(measured.get("weight_bytes", 0)),
        "runs": runs,
        "midbatch_ttft_p99_s": float(aux.get("midbatch_ttft_p99_s", 0.0)),
        "midbatch_ttft_p50_s": float(aux.get("midbatch_ttft_p50_s", 0.0)),
        "decode_step_s": float(aux.get("decode_step_s", 0.0)),
        "prefill_s": float(aux.get("prefill_s", 0.0)),
        "midbatch": midbatch,
        "greedy_agreement": _agreement(runs),
        "teacher_forced": aux.get("teacher_forced"),
        "skipped_systems": dict(args.skipped_systems),
    }
    report["ratios"] = compute_ratios(runs)
    report["targets"] = evaluate_targets(report)
    return report


def write_outputs(report: dict[str, Any], out_dir: Path, name: str = "engine") -> list[Path]:
    """Write ``name``.json, .md and .png (a stale PNG is removed if plotting fails)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f"{name}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(report), encoding="utf-8")
    try:
        write_plot(report, png_path)
    except Exception as exc:  # the numbers matter more than the picture
        png_path.unlink(missing_ok=True)
        print(f"warning: could not draw {png_path}: {exc}")
        return [json_path, md_path]
    return [json_path, md_path, png_path]


def _progress(record: dict[str, Any], seconds: float) -> str:
    if record.get("error"):
        return f"{seconds:.1f} s  FAILED: {str(record['error']).strip().splitlines()[-1][:120]}"
    if "output_tokens_per_s" in record:
        return (
            f"{seconds:.1f} s  {record['output_tokens_per_s']:.1f} out tok/s, "
            f"TTFT p50 {record['ttft_p50_s']:.3f} s"
        )
    parts = [f"{seconds:.1f} s  matmul {record.get('matmul_gflops', 0):.1f} GFLOP/s"]
    if "midbatch_ttft_p99_s" in record:
        parts.append(f"mid-batch TTFT p99 {record['midbatch_ttft_p99_s']:.3f} s")
    if record.get("midbatch_error"):
        parts.append(f"mid-batch FAILED: {record['midbatch_error'][:100]}")
    return ", ".join(parts)


def wait_for_quiet(max_wait_s: float) -> float:
    """Wait up to ``max_wait_s`` until the machine is mostly idle (other processes slow runs
    down badly on a small machine); returns the seconds waited."""
    started = time.monotonic()
    while True:
        before = cpu_sample()
        time.sleep(QUIET_SAMPLE_S)
        after = cpu_sample()
        busy, total = after[0] - before[0], after[1] - before[1]
        waited = time.monotonic() - started
        if total <= 0 or busy / total < QUIET_CPU_FRACTION or waited >= max_wait_s:
            return waited


def run_jobs(
    jobs: Sequence[JobSpec], args: argparse.Namespace, started: float
) -> list[tuple[JobSpec, dict[str, Any]]]:
    """Run every job in its own worker process, ``--parallel-workers`` at a time, printing
    progress; returns ``(spec, record)`` pairs in plan order."""
    records: dict[int, dict[str, Any]] = {}

    def one(number: int, spec: JobSpec, workdir: Path) -> None:
        def budget_left() -> float:
            if args.time_budget_s <= 0:
                return float("inf")
            return float(args.time_budget_s - (time.monotonic() - started) - BUDGET_RESERVE_S)

        waited = 0.0
        if args.wait_idle_s > 0 and args.parallel_workers <= 1:
            waited = wait_for_quiet(
                min(args.wait_idle_s, max(0.0, budget_left() - MIN_JOB_SECONDS))
            )
        job_started = time.monotonic()
        timeout = min(args.worker_timeout_s, budget_left())
        if timeout < MIN_JOB_SECONDS:
            record: dict[str, Any] = {"error": "skipped: --time-budget-s exhausted"}
        else:
            python = worker_python(spec.system, args.vllm_python)
            record = run_worker_process(spec, timeout, workdir, python)
        record["waited_for_idle_s"] = waited
        records[number] = record
        seconds = time.monotonic() - job_started
        line = f"[{number}/{len(jobs)}] {spec.label}: {_progress(record, seconds)}"
        if waited > 2 * QUIET_SAMPLE_S:
            line += f" (waited {waited:.0f} s for a quiet CPU)"
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        workdir = Path(tmp)
        if args.parallel_workers <= 1:
            for number, spec in enumerate(jobs, 1):
                one(number, spec, workdir)
        else:
            with ThreadPoolExecutor(max_workers=args.parallel_workers) as pool:
                futures = [
                    pool.submit(one, number, spec, workdir) for number, spec in enumerate(jobs, 1)
                ]
                for future in futures:
                    future.result()
    return [(spec, records[number]) for number, spec in enumerate(jobs, 1)]
