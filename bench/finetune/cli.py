"""``python -m bench.finetune``: issue 19's figures on one secure suite, the two experiments (or
those named with ``--experiment``) one after the other; writes ``finetune.json``,
``finetune.md`` and ``finetune.png`` under ``--out-dir`` (``bench/results``; a smoke run's go
under ``.sluice/bench/finetune-smoke``) with this run's figures only.

The full run is SmolLM2-135M-Instruct (``sluice up``'s default model) and takes about 13
minutes on 2 idle CPUs (each experiment is bounded: at most 26 minutes in all when the product
stalls); ``--smoke`` runs the whole path on tiny-random-llama with short phases in about a
minute and a half (its numbers mean nothing).

Modules: :mod:`.suite` (the suite, the nodes' training flags), :mod:`.calls` (raw stubs),
:mod:`.task` (the quality task), :mod:`.sharing` and :mod:`.resume` (the experiments),
:mod:`.figures` (definitions), :mod:`.report` (the table), :mod:`.plot` (the picture). Every
process started is stopped by its PID at the end, on errors too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.finetune.calls import TrainSpec
from bench.finetune.figures import __doc__ as DEFINITIONS
from bench.finetune.plot import write_plot
from bench.finetune.report import disturbed, markdown, rows, table
from bench.finetune.resume import ResumeOptions, resume_and_quality
from bench.finetune.sharing import SharingOptions, sharing
from bench.finetune.suite import NodeFlags, TreeCpuMeter, running
from bench.finetune.task import HELD_OUT_ITEMS
from bench.jobs.suite import CpuMeter, Running
from bench.paths import RESULTS_DIR, SCRATCH_DIR
from bench.report_table import cpu_line

Experiment = Callable[[Running], Awaitable[dict[str, Any]]]
NAMES = ("sharing", "resume")
FULL_MODEL = "smollm2-135m-instruct"
SMOKE_MODEL = "tiny-random-llama"
SMOKE_OUT_DIR = SCRATCH_DIR / "finetune-smoke"


@dataclass(frozen=True)
class Plan:
    """Everything a run does: the model, the fine-tune, each experiment's options and the
    longest each may run once the suite serves (the whole run stays bounded even when the
    product stalls)."""

    mode: str
    model: str
    spec: TrainSpec
    sharing: SharingOptions
    resume: ResumeOptions
    flags: NodeFlags
    budget_s: dict[str, float]
    device: str = "cpu"
    """Where the nodes run the model (``cuda`` for the GPU check; float32 either way)."""


def full_plan() -> Plan:
    """SmolLM2: ~9 min of phases, two 80-step fine-tunes (~13 min in all on 2 idle CPUs)."""
    return Plan(
        mode="full",
        model=FULL_MODEL,
        spec=TrainSpec(),
        sharing=SharingOptions(),
        resume=ResumeOptions(),
        flags=NodeFlags(),
        budget_s={"sharing": 900.0, "resume": 660.0},
    )


def smoke_plan() -> Plan:
    """tiny-random-llama, seconds-long phases, short fine-tunes: the whole path in ~2 min."""
    return Plan(
        mode="smoke",
        model=SMOKE_MODEL,
        spec=TrainSpec(steps=40, checkpoint_every=4, max_sequence_tokens=64, learning_rate=5e-3),
        sharing=SharingOptions(
            phase_s=6.0,
            compared_phase_s=6.0,
            alone_s=4.0,
            saturate_warmup_s=2.0,
            saturate_s=4.0,
            realtime_tokens=128,
            drain_s=5.0,
            job_start_timeout_s=60.0,
        ),
        resume=ResumeOptions(eval_prompts=6, job_timeout_s=90.0, adapter_wait_s=10.0),
        flags=NodeFlags(),
        budget_s={"sharing": 100.0, "resume": 120.0},
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny-random-llama, short phases")
    p.add_argument("--experiment", action="append", choices=NAMES, help="repeatable; default: all")
    p.add_argument("--phase-s", type=float, help="each REALTIME phase of the curve")
    p.add_argument(
        "--compared-phase-s", type=float, help="the compared phase and each phase without training"
    )
    p.add_argument("--alone-s", type=float, help="the load job alone")
    p.add_argument("--steps", type=int, help="optimizer steps of the reference and killed jobs")
    p.add_argument("--yield-bound-ms", type=float, help="the nodes' --training-yield-bound-ms")
    p.add_argument(
        "--itl-budget-ms",
        type=float,
        help="the nodes' --training-itl-budget-ms (default: none, the node's share and tail rule)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the nodes' device")
    p.add_argument(
        "--training-concurrency",
        choices=("auto", "gaps", "thread"),
        help="the nodes' --training-concurrency (default auto: thread on CUDA, gaps on the CPU)",
    )
    p.add_argument("--eval-prompts", type=int, choices=range(1, len(HELD_OUT_ITEMS) + 1))
    p.add_argument(
        "--out-dir",
        type=Path,
        help=f"default: {RESULTS_DIR}, or {SMOKE_OUT_DIR} with --smoke (never the real results)",
    )
    p.add_argument("--run-dir", type=Path, default=SCRATCH_DIR / "finetune", help="logs, stores")
    return p.parse_args(argv)


def plan_of(args: argparse.Namespace) -> Plan:
    """The mode's plan with the command line's overrides."""
    plan = smoke_plan() if args.smoke else full_plan()
    if args.phase_s is not None:
        plan = replace(plan, sharing=replace(plan.sharing, phase_s=args.phase_s))
    if args.compared_phase_s is not None:
        plan = replace(plan, sharing=replace(plan.sharing, compared_phase_s=args.compared_phase_s))
    if args.alone_s is not None:
        plan = replace(plan, sharing=replace(plan.sharing, alone_s=args.alone_s))
    if args.steps is not None:
        plan = replace(plan, spec=replace(plan.spec, steps=args.steps))
    if args.yield_bound_ms is not None:
        plan = replace(plan, flags=replace(plan.flags, yield_bound_ms=args.yield_bound_ms))
    if args.itl_budget_ms is not None:
        plan = replace(plan, flags=replace(plan.flags, itl_budget_ms=args.itl_budget_ms))
    if args.training_concurrency is not None:
        plan = replace(plan, flags=replace(plan.flags, concurrency=args.training_concurrency))
    if args.eval_prompts is not None:
        plan = replace(plan, resume=replace(plan.resume, eval_prompts=args.eval_prompts))
    return replace(plan, device=args.device)


def experiments(plan: Plan) -> dict[str, Experiment]:
    """Each experiment, bound to the plan."""
    return {
        "sharing": lambda ctx: sharing(ctx, plan.model, plan.spec, plan.sharing, plan.flags),
        "resume": lambda ctx: resume_and_quality(
            ctx, plan.model, plan.spec, plan.resume, plan.flags
        ),
    }


async def run_one(
    name: str, experiment: Experiment, ctx: Running, budget_s: float
) -> dict[str, Any]:
    """One experiment on the running suite; its entry (with ``error`` when it failed)."""
    entry: dict[str, Any] = {}
    started = time.monotonic()
    cpu = TreeCpuMeter()
    try:
        entry.update(await asyncio.wait_for(experiment(ctx), budget_s))
    except Exception as exc:  # reported in the results, not raised: the next experiment runs
        why = str(exc) or f"not done within its budget of {budget_s:g} s"
        entry["error"] = f"{type(exc).__name__}: {why}"
        print(f"   {name}: {entry['error']}", flush=True)
    entry["wall_s"] = round(time.monotonic() - started, 1)
    entry["cpu"] = cpu.figures()
    entry["timeline"] = [{"t_s": t, "event": e} for t, e in ctx.timeline]
    return entry


async def run(plan: Plan, names: list[str], run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every named experiment on one suite, one after the other; their entries."""
    chosen = experiments(plan)
    entries: dict[str, dict[str, Any]] = {}

    def say(message: str) -> None:
        print(f"   {message}", flush=True)

    try:
        async with running(run_dir, plan.model, plan.device, say=say) as suite:
            for name in NAMES:
                if name not in names:
                    continue
                print(f"== {name}", flush=True)
                ctx = Running(suite, say=say)
                entries[name] = await run_one(name, chosen[name], ctx, plan.budget_s[name])
                print("\n".join(table(rows({name: entries[name]}))[2:]), flush=True)
    except Exception as exc:  # the suite did not start (or stop): every experiment left says so
        for name in names:
            entries.setdefault(name, {"error": f"suite: {type(exc).__name__}: {exc}"})
    return {name: entries[name] for name in NAMES if name in entries}


def settings_of(plan: Plan, run_dir: Path) -> dict[str, Any]:
    """What the run used, as recorded in the results."""
    return {
        "mode": plan.mode,
        "model": plan.model,
        "device": plan.device,
        "node_flags": " ".join(plan.flags.flags(Path("<run-dir>"))),
        "yield_bound_ms": plan.flags.yield_bound_ms,
        "itl_budget_ms": plan.flags.itl_budget_ms,
        "itl_budget": "none (the node's default: its share of the decode time and its own "
        "step-time tail)"
        if plan.flags.itl_budget_ms is None
        else f"{plan.flags.itl_budget_ms:g} ms",
        "finetune": asdict(plan.spec),
        "sharing": asdict(plan.sharing),
        "resume": asdict(plan.resume),
        "budget_s": plan.budget_s,
        "run_dir": str(run_dir),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write finetune.json, .md and .png; exit 1 when an experiment could not be
    measured."""
    args = parse_args(argv)
    plan = plan_of(args)
    if plan.sharing.compared_load not in plan.sharing.loads:
        raise SystemExit("the compared load must be one of the loads")
    names = args.experiment or list(NAMES)
    run_dir = args.run_dir.resolve()
    started, meter = time.monotonic(), CpuMeter()
    entries = asyncio.run(run(plan, names, run_dir))
    cpu = meter.figures()  # the suite has stopped: its processes are reaped and counted
    doc: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "settings": settings_of(plan, run_dir),
        "wall_s": round(time.monotonic() - started, 1),
        "cpu": cpu,
        "definitions": DEFINITIONS,
        "figures": rows(entries),
        "experiments": entries,
    }
    out_dir = args.out_dir or (SMOKE_OUT_DIR if args.smoke else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "finetune.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / "finetune.md").write_text(markdown(doc) + "\n")
    write_plot(doc, out_dir / "finetune.png")
    for line in disturbed(entries):
        print(line)
    print(f"the whole run: {cpu_line(cpu)[2:]}")
    print(f"wrote {out_dir / 'finetune.json'}, .md and .png in {doc['wall_s']:.0f} s")
    return 1 if any("error" in e for e in entries.values()) else 0
