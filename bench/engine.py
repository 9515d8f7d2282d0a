"""Engine benchmark: Hugging Face baselines against the Sluice engine on a real model, in one run.

``python -m bench.engine`` (or ``make bench-engine``) serves one fixed, seeded workload (64
requests, prompts of 20–300 random tokens, 16/64/128 new tokens, greedy, EOS ignored) with

* ``hf_sequential`` (a): ``model.generate`` one request at a time (C=1 only),
* ``hf_static`` (b): ``generate`` on left-padded static batches of C in arrival order,
* ``hf_generate_batch`` (c): transformers' continuous-batching manager (``generate_batch``'s
  engine) driven as a closed loop of C requests,
* ``sluice`` (d): ``inference_node.engine.build_engine`` with C asyncio clients,

each (system, C) in its own worker subprocess, so peak RSS is that system's own. C=1 runs serve
only the first ``--sequential-requests`` requests (HF decodes ~14 tok/s on 2 cores). A further
worker measures the fp32 matmul roofline and TTFT of requests arriving while 31 others decode.
Results go to ``engine.json``, ``engine.md`` and ``engine.png`` under ``--out-dir``.
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
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.engine_common import (
    GIB,
    HF_GENERATE_BATCH,
    HF_SEQUENTIAL,
    HF_STATIC,
    JOB_AUX,
    JOB_RUN,
    OUTPUT_LENGTHS,
    PROMPT_MAX_TOKENS,
    PROMPT_MIN_TOKENS,
    SLUICE,
    SYSTEMS,
    JobSpec,
    failed_run,
)
from bench.engine_report import (
    add_roofline,
    compute_ratios,
    evaluate_targets,
    render_markdown,
    render_text,
    write_plot,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CONCURRENCY = "1,8,32,64"
MAX_AUTO_BASELINE_CONCURRENCY = 32
DEFAULT_KV_BUDGET_BYTES = 2 * GIB
DEFAULT_WORKER_TIMEOUT_S = 1800.0
BUDGET_RESERVE_S = 15.0
MIN_JOB_SECONDS = 20.0
ERROR_TAIL_CHARS = 3000
BUSY_LOAD_PER_CPU = 0.5
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _int_list(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _systems(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown systems {unknown}; choose from {SYSTEMS}")
    return [s for s in SYSTEMS if s in chosen]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see ``--help``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.engine",
        description="HF generate / static batches / generate_batch vs the Sluice engine.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--requests", type=int, default=64, help="workload size")
    p.add_argument(
        "--concurrency",
        type=_int_list,
        default=_int_list(DEFAULT_CONCURRENCY),
        help="closed-loop concurrencies for sluice (default 1,8,32,64)",
    )
    p.add_argument(
        "--baseline-concurrency",
        type=_int_list,
        default=None,
        help="concurrencies for hf_static and hf_generate_batch (default: the "
        f"--concurrency values in [2, {MAX_AUTO_BASELINE_CONCURRENCY}])",
    )
    p.add_argument(
        "--systems",
        type=_systems,
        default=list(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)}",
    )
    p.add_argument(
        "--sequential-requests",
        type=int,
        default=12,
        help="requests served by the C=1 runs (the first N of the workload)",
    )
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-budget-bytes", type=int, default=DEFAULT_KV_BUDGET_BYTES)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sluice" / "models")
    p.add_argument("--skip-midbatch", action="store_true", help="skip the mid-batch TTFT mode")
    p.add_argument("--midbatch-background-tokens", type=int, default=400)
    p.add_argument("--midbatch-probes", type=int, default=10)
    p.add_argument(
        "--midbatch-start-timeout-s",
        type=float,
        default=120.0,
        help="how long to wait for all 31 background requests to start decoding",
    )
    p.add_argument("--midbatch-probe-timeout-s", type=float, default=30.0)
    p.add_argument(
        "--matmul-seconds", type=float, default=1.5, help="timed seconds per matmul shape"
    )
    p.add_argument("--worker-timeout-s", type=float, default=DEFAULT_WORKER_TIMEOUT_S)
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=0.0,
        help="stop starting workers once this much wall time is used (0: no limit)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.requests < 1 or args.sequential_requests < 1:
        p.error("--requests and --sequential-requests must be at least 1")
    if args.baseline_concurrency is None:
        args.baseline_concurrency = [
            c for c in args.concurrency if 1 < c <= MAX_AUTO_BASELINE_CONCURRENCY
        ]
    return args


def plan_jobs(args: argparse.Namespace) -> list[JobSpec]:
    """The aux job (roofline, mid-batch) first, then sluice, then the HF baselines."""
    sequential = min(args.sequential_requests, args.requests)
    common: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "cache_dir": str(args.cache_dir),
        "seed": args.seed,
        "workload_requests": args.requests,
        "kv_budget_bytes": args.kv_budget_bytes,
        "max_batched_tokens": args.max_batched_tokens,
    }
    jobs = [
        JobSpec(
            kind=JOB_AUX,
            system="",
            concurrency=0,
            requests=0,
            matmul_seconds=args.matmul_seconds,
            midbatch=not args.skip_midbatch and SLUICE in args.systems,
            midbatch_background_tokens=args.midbatch_background_tokens,
            midbatch_probes=args.midbatch_probes,
            midbatch_start_timeout_s=args.midbatch_start_timeout_s,
            midbatch_probe_timeout_s=args.midbatch_probe_timeout_s,
            **common,
        )
    ]
    runs: list[tuple[str, int]] = []
    if SLUICE in args.systems:
        runs += [(SLUICE, c) for c in args.concurrency]
    if HF_SEQUENTIAL in args.systems and 1 in args.concurrency:
        runs.append((HF_SEQUENTIAL, 1))
    for system in (HF_STATIC, HF_GENERATE_BATCH):
        if system in args.systems:
            runs += [(system, c) for c in args.baseline_concurrency]
    for system, c in runs:
        requests = sequential if c == 1 else args.requests
        jobs.append(
            JobSpec(kind=JOB_RUN, system=system, concurrency=c, requests=requests, **common)
        )
    return jobs


def run_worker_process(spec: JobSpec, timeout_s: float, workdir: Path) -> dict[str, Any]:
    """Run ``spec`` in a fresh ``python -m bench.engine --worker`` process and read its record.

    A worker that fails, crashes or times out gives ``{"error": ...}`` instead.
    """
    name = f"{spec.kind}-{spec.system or 'aux'}-{spec.concurrency}"
    out_path, log_path = workdir / f"{name}.json", workdir / f"{name}.log"
    cmd = [
        sys.executable,
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
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
            returncode: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
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


def worker_main(spec_json: str, out_path: Path) -> int:
    """Entry point of a worker subprocess: run the job, write its record (or error) as JSON."""
    spec = JobSpec.from_json(spec_json)
    try:
        from bench.engine_workers import run_job  # noqa: PLC0415 - the driver stays torch-free

        record = run_job(spec)
        status = 0
    except Exception as exc:
        record = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        status = 1
    out_path.write_text(json.dumps(record), encoding="utf-8")
    return status


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
            "kv_budget_bytes": args.kv_budget_bytes,
            "max_batched_tokens": args.max_batched_tokens,
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
    }
    for key in ("prefill_samples_s",):
        if key in aux:
            midbatch[key] = aux[key]
    report["ratios"] = compute_ratios(runs)
    report["targets"] = evaluate_targets(report)
    return report


def write_outputs(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write engine.json, engine.md and engine.png (a stale PNG is removed if plotting fails)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f"engine.{ext}" for ext in ("json", "md", "png"))
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one of its jobs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.worker_out)
    started = time.monotonic()
    machine = machine_info()
    jobs = plan_jobs(args)
    print(
        f"engine benchmark: {args.model} on {args.device} ({args.dtype}), "
        f"{args.requests} requests, seed {args.seed}, {len(jobs)} workers"
    )
    load = machine["loadavg_start"][0]
    if load > BUSY_LOAD_PER_CPU * machine["cpu_count"]:
        print(f"warning: the machine is busy (load average {load}); timings will be noisy")
    aux: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        for number, spec in enumerate(jobs, 1):
            timeout = args.worker_timeout_s
            if args.time_budget_s > 0:
                left = args.time_budget_s - (time.monotonic() - started) - BUDGET_RESERVE_S
                timeout = min(timeout, left)
            print(f"[{number}/{len(jobs)}] {spec.label} ... ", end="", flush=True)
            job_started = time.monotonic()
            if timeout < MIN_JOB_SECONDS:
                record: dict[str, Any] = {"error": "skipped: --time-budget-s exhausted"}
            else:
                record = run_worker_process(spec, timeout, Path(tmp))
            print(_progress(record, time.monotonic() - job_started), flush=True)
            if spec.kind == JOB_AUX:
                aux = record
            elif record.get("error"):
                runs.append(
                    {
                        **failed_run(spec, str(record["error"])),
                        "error_detail": record.get("error_detail", ""),
                    }
                )
            else:
                runs.append(record)
    report = build_report(args, argv, machine, aux, runs)
    report["duration_s"] = time.monotonic() - started
    paths = write_outputs(report, args.out_dir)
    print()
    print(render_text(report))
    print()
    print(f"wrote {', '.join(str(p) for p in paths)} in {report['duration_s']:.0f} s")
    return 0 if any(not r.get("error") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
