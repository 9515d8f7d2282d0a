"""``python -m bench.jobs``: the three experiments of issue 18's figures (or those named with
``--experiment``), each in a fresh secure suite under ``--run-dir``, one after the other;
writes ``jobs.json`` and ``jobs.md`` under ``--out-dir`` with this run's figures only.

Modules: :mod:`.suite` (the supervised suite, the schedulers' jobs settings), :mod:`.calls` (raw
stubs), :mod:`.metrics` (``/metrics``), :mod:`.lost`, :mod:`.gaps`, :mod:`.deadlines` (the
experiments), :mod:`.figures` (definitions), :mod:`.report` (the table). Every process started
is stopped by its PID at the end of its experiment, on errors too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.jobs.deadlines import DeadlineOptions, deadlines
from bench.jobs.figures import __doc__ as DEFINITIONS
from bench.jobs.gaps import GapsOptions, gaps_filled
from bench.jobs.lost import LostOptions, nothing_lost
from bench.jobs.report import disturbed, markdown, rows, table
from bench.jobs.suite import CpuMeter, JobSettings, Running, running
from bench.paths import REPO_ROOT, RESULTS_DIR, SCRATCH_DIR

Experiment = Callable[[Running], Awaitable[dict[str, Any]]]
NAMES = ("nothing_lost", "gaps", "deadlines")
BUDGET_S = {"nothing_lost": 180.0, "gaps": 450.0, "deadlines": 180.0}
"""Longest each experiment may run once its suite serves (the suite's start and stop take
about 30 s more each): the whole run stays within 15 minutes on 2 CPUs even when the product
stalls."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    lost, gaps, jobs = LostOptions(), GapsOptions(), JobSettings()
    p = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__)
    p.add_argument("--experiment", action="append", choices=NAMES, help="repeatable; default: all")
    p.add_argument("--lines", type=int, default=lost.lines, help="lines of the nothing-lost job")
    p.add_argument("--line-tokens", type=int, default=lost.line_tokens)
    p.add_argument("--phase-s", type=float, default=gaps.phase_s, help="each REALTIME phase")
    p.add_argument("--saturate-s", type=float, default=gaps.window_s)
    p.add_argument("--seed", type=int, default=gaps.seed)
    p.add_argument("--reclaim-idle-s", type=float, default=jobs.reclaim_idle_s)
    p.add_argument("--heartbeat-s", type=float, default=jobs.heartbeat_s)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--run-dir", type=Path, default=SCRATCH_DIR / "jobs", help="logs, stores")
    return p.parse_args(argv)


def experiments(args: argparse.Namespace) -> dict[str, tuple[Experiment, dict[str, Any]]]:
    """Each experiment with its options (as recorded in the results)."""
    lost = LostOptions(lines=args.lines, line_tokens=args.line_tokens)
    gaps = GapsOptions(phase_s=args.phase_s, window_s=args.saturate_s, seed=args.seed)
    late = DeadlineOptions()
    return {
        "nothing_lost": (lambda ctx: nothing_lost(ctx, lost), asdict(lost)),
        "gaps": (lambda ctx: gaps_filled(ctx, gaps), asdict(gaps)),
        "deadlines": (lambda ctx: deadlines(ctx, late), asdict(late)),
    }


async def run_one(
    name: str, experiment: Experiment, settings: JobSettings, run_root: Path
) -> dict[str, Any]:
    """One experiment in a fresh suite; its entry (with ``error`` when it failed)."""
    run_dir = run_root / name
    shown = run_dir.relative_to(REPO_ROOT) if run_dir.is_relative_to(REPO_ROOT) else run_dir
    entry: dict[str, Any] = {}
    started = time.monotonic()
    cpu = CpuMeter()
    ctx: Running | None = None
    try:
        async with running(run_dir, settings, say=lambda m: print(f"   {m}", flush=True)) as ctx:
            entry.update(await asyncio.wait_for(experiment(ctx), BUDGET_S[name]))
    except Exception as exc:  # reported in the results, not raised: the next experiment runs
        why = str(exc) or f"not done within its budget of {BUDGET_S[name]:g} s"
        entry["error"] = f"{type(exc).__name__}: {why}"
        print(f"   {name}: {entry['error']}", flush=True)
        if ctx is not None:
            entry["timeline"] = [{"t_s": t, "event": e} for t, e in ctx.timeline]
    entry["run_dir"] = str(shown)
    entry["wall_s"] = round(time.monotonic() - started, 1)
    entry["cpu"] = cpu.figures()
    return entry


async def run(
    args: argparse.Namespace, settings: JobSettings
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every named experiment, one after the other; their entries and options."""
    chosen = experiments(args)
    names = args.experiment or list(NAMES)
    entries, options = {}, {}
    for name in NAMES:
        if name not in names:
            continue
        print(f"== {name}", flush=True)
        experiment, opts = chosen[name]
        options[name] = opts
        entries[name] = await run_one(name, experiment, settings, args.run_dir.resolve())
        print("\n".join(table(rows({name: entries[name]}))[2:]), flush=True)
    return entries, options


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write jobs.json and jobs.md; exit 1 when an experiment could not be measured."""
    args = parse_args(argv)
    settings = JobSettings(reclaim_idle_s=args.reclaim_idle_s, heartbeat_s=args.heartbeat_s)
    started = time.monotonic()
    entries, options = asyncio.run(run(args, settings))
    doc = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "settings": {
            "scheduler_flags": " ".join(settings.flags()),
            **options,
        },
        "wall_s": round(time.monotonic() - started, 1),
        "definitions": DEFINITIONS,
        "figures": rows(entries),
        "experiments": entries,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "jobs.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out_dir / "jobs.md").write_text(markdown(doc) + "\n")
    for line in disturbed(entries):
        print(line)
    print(f"wrote {args.out_dir / 'jobs.json'} and jobs.md in {doc['wall_s']:.0f} s")
    return 1 if any("error" in e for e in entries.values()) else 0
