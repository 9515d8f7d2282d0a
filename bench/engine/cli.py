"""Engine benchmark: Hugging Face baselines against the Sluice engine on a real model, in one run.

``python -m bench.engine`` (or ``make bench-engine``) serves one fixed, seeded workload (64
requests, prompts of 20–300 random tokens, 16/64/128 new tokens, greedy, EOS ignored) with

* ``hf_sequential`` (a): ``model.generate`` one request at a time (C=1 only),
* ``hf_static`` (b): ``generate`` on left-padded static batches of C in arrival order,
* ``hf_generate_batch`` (c): transformers' continuous-batching manager (``generate_batch``'s
  engine) driven as a closed loop of C requests,
* ``sluice`` (d): ``inference_node.engine.build_engine`` with C asyncio clients,
* ``vllm`` (e): vLLM's own v1 ``AsyncLLM`` set up as an ``--engine vllm`` node sets it up, with
  C asyncio clients (:mod:`bench.engine.vllm_worker`),

each (system, C) in its own worker subprocess, so peak RSS is that system's own. The ``vllm``
workers run on ``--vllm-python`` (``.venv-vllm``'s interpreter, which ``make setup-vllm``
builds), every other worker on this interpreter; where that interpreter is missing, ``vllm`` is
left out of the default systems (and out of an explicit ``--systems``) with a note in the
report. ``sluice`` and ``vllm`` run at every ``--concurrency``. C=1 runs serve only the first
``--sequential-requests`` requests (HF decodes ~14 tok/s on 2 cores). A further worker measures
the fp32 matmul roofline and TTFT of requests arriving while 31 others decode. Results go to
``engine.json``, ``engine.md`` and ``engine.png`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.engine.common import (
    DEFAULT_MODEL,
    GIB,
    HF_GENERATE_BATCH,
    HF_SEQUENTIAL,
    HF_STATIC,
    JOB_AUX,
    JOB_RUN,
    SLUICE,
    SYSTEMS,
    VLLM,
    JobSpec,
    failed_run,
)
from bench.engine.driver import (
    build_report,
    machine_info,
    run_jobs,
    write_outputs,
)
from bench.engine.report import render_text
from bench.paths import REPO_ROOT, RESULTS_DIR

DEFAULT_CONCURRENCY = "1,8,32,64"
MAX_AUTO_BASELINE_CONCURRENCY = 32
DEFAULT_KV_BUDGET_BYTES = 2 * GIB
DEFAULT_WORKER_TIMEOUT_S = 1800.0
# Not resolved: a virtualenv's python is a symlink, and only the path inside the virtualenv
# makes it that virtualenv's interpreter.
DEFAULT_VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"


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


def interpreter_exists(python: Path) -> bool:
    """Whether ``python`` is an executable file (a symlink to one counts)."""
    return python.is_file() and os.access(python, os.X_OK)


def default_systems(vllm_python: Path) -> list[str]:
    """Every system, ``vllm`` only when ``vllm_python`` exists."""
    return [s for s in SYSTEMS if s != VLLM or interpreter_exists(vllm_python)]


def choose_systems(
    requested: Sequence[str] | None, vllm_python: Path
) -> tuple[list[str], dict[str, str]]:
    """The systems to run (``requested``, or every system when ``None``) and those skipped,
    with why: ``vllm`` is skipped when ``vllm_python`` does not exist."""
    chosen = list(SYSTEMS if requested is None else requested)
    skipped: dict[str, str] = {}
    if VLLM in chosen and not interpreter_exists(vllm_python):
        chosen.remove(VLLM)
        skipped[VLLM] = f"{vllm_python} not found (`make setup-vllm` builds it)"
    return chosen, skipped


def _add_aux_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the aux job: the mid-batch TTFT mode and the matmul roofline."""
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


def _add_runner_flags(p: argparse.ArgumentParser) -> None:
    """Flags of how the driver runs its workers."""
    p.add_argument("--worker-timeout-s", type=float, default=DEFAULT_WORKER_TIMEOUT_S)
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=0.0,
        help="stop starting workers once this much wall time is used (0: no limit)",
    )
    p.add_argument(
        "--wait-idle-s",
        type=float,
        default=60.0,
        help="before each worker, wait up to this long for other processes to leave the CPU",
    )
    p.add_argument(
        "--parallel-workers",
        type=int,
        default=1,
        help="workers run at once; above 1 they disturb each other's timings (smoke tests only)",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see ``--help``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.engine",
        description="HF generate / static batches / generate_batch / vLLM vs the Sluice engine.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--requests", type=int, default=64, help="workload size")
    p.add_argument(
        "--concurrency",
        type=_int_list,
        default=_int_list(DEFAULT_CONCURRENCY),
        help="closed-loop concurrencies for sluice and vllm (default 1,8,32,64)",
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
        default=None,
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all; {VLLM} only "
        "where --vllm-python exists)",
    )
    p.add_argument(
        "--vllm-python",
        type=Path,
        default=DEFAULT_VLLM_PYTHON,
        help="the interpreter of the vllm workers (default: .venv-vllm's)",
    )
    p.add_argument(
        "--sequential-requests",
        type=int,
        default=12,
        help="requests served by the C=1 runs (the first N of the workload)",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--out-name", default="engine", help="results are written to OUT_DIR/OUT_NAME.{json,md,png}"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-budget-bytes", type=int, default=DEFAULT_KV_BUDGET_BYTES)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sluice" / "models")
    _add_aux_flags(p)
    _add_runner_flags(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.requests < 1 or args.sequential_requests < 1:
        p.error("--requests and --sequential-requests must be at least 1")
    if args.parallel_workers < 1:
        p.error("--parallel-workers must be at least 1")
    args.systems, args.skipped_systems = choose_systems(args.systems, args.vllm_python)
    if args.baseline_concurrency is None:
        args.baseline_concurrency = [
            c for c in args.concurrency if 1 < c <= MAX_AUTO_BASELINE_CONCURRENCY
        ]
    return args


def plan_jobs(args: argparse.Namespace) -> list[JobSpec]:
    """The aux job (roofline, mid-batch) first, then sluice, vllm, then the HF baselines."""
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
        # Workers running side by side share the CPUs rather than fight over them.
        "threads": max(1, (os.cpu_count() or 1) // args.parallel_workers),
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
    for system in (SLUICE, VLLM):
        if system in args.systems:
            runs += [(system, c) for c in args.concurrency]
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


def worker_main(spec_json: str, out_path: Path) -> int:
    """Entry point of a worker subprocess: run the job, write its record (or error) as JSON."""
    spec = JobSpec.from_json(spec_json)
    try:
        if spec.system == VLLM:
            # vLLM's interpreter: no HF or Sluice engine imports beside vLLM's own.
            from bench.engine.vllm_worker import run_vllm  # noqa: PLC0415

            record = run_vllm(spec)
        else:
            from bench.engine.workers import run_job  # noqa: PLC0415 - the driver stays torch-free

            record = run_job(spec)
        status = 0
    except Exception as exc:
        record = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        status = 1
    out_path.write_text(json.dumps(record), encoding="utf-8")
    return status


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one of its jobs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.worker_out)
    # SIGTERM unwinds like Ctrl-C: the running worker's process group is killed on the way.
    signal.signal(signal.SIGTERM, _terminated)
    started = time.monotonic()
    machine = machine_info()
    jobs = plan_jobs(args)
    print(
        f"engine benchmark: {args.model} on {args.device} ({args.dtype}), "
        f"{args.requests} requests, seed {args.seed}, {len(jobs)} workers"
    )
    for system, why in args.skipped_systems.items():
        print(f"{system}: skipped, {why}")
    if args.parallel_workers > 1:
        print(f"warning: {args.parallel_workers} workers run at once: timings are not comparable")
    aux: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    for spec, record in run_jobs(jobs, args, started):
        if spec.kind == JOB_AUX:
            aux = record
        elif record.get("error"):
            failed = failed_run(spec, str(record["error"]))
            runs.append({**failed, "error_detail": record.get("error_detail", "")})
            runs[-1]["waited_for_idle_s"] = record["waited_for_idle_s"]
        else:
            runs.append(record)
    report = build_report(args, argv, machine, aux, runs)
    report["duration_s"] = time.monotonic() - started
    paths = write_outputs(report, args.out_dir, args.out_name)
    print()
    print(render_text(report))
    print()
    print(f"wrote {', '.join(str(p) for p in paths)} in {report['duration_s']:.0f} s")
    return 0 if any(not r.get("error") for r in runs) else 1
