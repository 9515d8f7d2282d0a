"""``python -m bench.chaos``: every scenario (or those named with ``--scenario``), each in a
fresh suite on loopback, one after the other; writes ``chaos.json`` and ``chaos.md`` under
``--out-dir`` with this run's figures only.

Modules: :mod:`.suite` (the suite and extra processes), :mod:`.load` (steady load, probes),
:mod:`.proxy` (TCP fault proxy), :mod:`.fuzz` (descriptor-driven fuzzer), :mod:`.strangers`
(calls at the internal surfaces without a valid client certificate), :mod:`.scenarios` (the
faults), :mod:`.runner` (one scenario end to end), :mod:`.figures` (definitions and counts),
:mod:`.report` (JSON and markdown). Every process started is stopped by its PID at the end of
its scenario, on errors too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.chaos.load import LoadSettings
from bench.chaos.report import DEFINITIONS, markdown, table
from bench.chaos.runner import SCENARIOS, run_scenario
from bench.chaos.scenarios import ChaosOptions
from bench.paths import RESULTS_DIR, SCRATCH_DIR


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    defaults = ChaosOptions()
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    p.add_argument(
        "--scenario", action="append", choices=list(SCENARIOS), help="repeatable; default: all"
    )
    p.add_argument("--load-s", type=float, default=defaults.load_s, help="least load per scenario")
    p.add_argument("--fault-at-s", type=float, default=defaults.fault_at_s)
    p.add_argument("--after-s", type=float, default=defaults.after_s, help="load after the fault")
    p.add_argument("--grace-s", type=float, default=defaults.grace_s)
    p.add_argument("--tenants-workers", type=int, default=defaults.workers_per_tenant)
    p.add_argument("--stop-s", type=float, default=defaults.stop_s, help="SIGSTOP length")
    p.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    p.add_argument("--latency-s", type=float, default=defaults.latency_s)
    p.add_argument("--blackhole-s", type=float, default=defaults.blackhole_s)
    p.add_argument("--store-outage-s", type=float, default=defaults.store_outage_s)
    p.add_argument("--fuzz-count", type=int, default=defaults.fuzz_count)
    p.add_argument("--fuzz-max-s", type=float, default=defaults.fuzz_max_s)
    p.add_argument("--fuzz-seed", type=int, default=defaults.fuzz_seed)
    p.add_argument("--stranger-rounds", type=int, default=defaults.stranger_rounds)
    p.add_argument(
        "--no-supervise", action="store_true", help="do not drive the supervisor's restarts"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext suites (sluice up --insecure), to compare with the secure default",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--run-dir", type=Path, default=SCRATCH_DIR / "chaos", help="logs, stores")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> ChaosOptions:
    """The run's timings."""
    return ChaosOptions(
        load_s=args.load_s,
        fault_at_s=args.fault_at_s,
        after_s=args.after_s,
        grace_s=args.grace_s,
        workers_per_tenant=args.tenants_workers,
        stop_s=args.stop_s,
        latency_ms=args.latency_ms,
        latency_s=args.latency_s,
        blackhole_s=args.blackhole_s,
        store_outage_s=args.store_outage_s,
        fuzz_count=args.fuzz_count,
        fuzz_max_s=args.fuzz_max_s,
        fuzz_seed=args.fuzz_seed,
        stranger_rounds=args.stranger_rounds,
        supervise=not args.no_supervise,
        insecure=args.insecure,
    )


async def run(names: list[str], options: ChaosOptions, run_root: Path) -> list[dict[str, Any]]:
    """Every named scenario, one after the other."""
    entries = []
    for name in names:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        entry = await run_scenario(name, options, run_root, say=lambda m: print(f"   {m}"))
        entry["wall_s"] = round(time.monotonic() - started, 1)
        entries.append(entry)
        print("\n".join(table([entry])[2:]), flush=True)
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write chaos.json and chaos.md; exit 1 when a scenario could not be measured."""
    args = parse_args(argv)
    options = options_from(args)
    names = args.scenario or list(SCENARIOS)
    started = time.monotonic()
    entries = asyncio.run(run(names, options, args.run_dir.resolve()))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    doc = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {**asdict(options), "max_new_tokens": LoadSettings().max_new_tokens},
        "wall_s": round(time.monotonic() - started, 1),
        "definitions": DEFINITIONS,
        "scenarios": entries,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "chaos.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out_dir / "chaos.md").write_text(markdown(doc) + "\n")
    print(f"wrote {args.out_dir / 'chaos.json'} and chaos.md in {doc['wall_s']:.0f} s")
    return 1 if any("error" in e for e in entries) else 0
