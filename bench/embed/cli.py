"""``python -m bench.embed``: issue 20's embedding figure in one run.

Starts an etcd and four real inference nodes serving all-MiniLM-L6-v2 (:data:`MODES`): one at
a time (``--embed-max-batch 1 --embed-workers 1``: every Embed its own forward on one
embedding thread, the node before batching, the baseline), batched (the node's defaults), and,
reported only, batched on one embedding thread and each Embed alone on the default threads.
Against each, straight over gRPC, in turns: one caller (low load:
latency), then 32 concurrent closed-loop callers of single-text requests (requests/s,
latency), for ``--rounds`` rounds. Writes ``embed.json`` and ``embed.md`` under ``--out-dir``
with this run's figures only (:mod:`.report`). Every process started is stopped by its PID, on
errors too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.embed.load import TENANTS, Phase, closed_loop, sentences
from bench.embed.node import HOST, MODEL, RunningNode, embedding_node
from bench.embed.report import HIGH, LOW, markdown, rows
from bench.jobs.suite import CpuMeter
from bench.paths import RESULTS_DIR, SCRATCH_DIR
from bench.scheduler.report import finite
from inference_node.torch_threads import default_workers
from sluice.local.stores import etcd_process

TEXTS = 512
WORDS = (4, 40)
MODES = {
    "one_at_a_time": (1, 1),
    "batched": (0, 0),
    "batched_one_thread": (0, 1),
    "alone_default_workers": (1, 0),
}
"""Each mode's ``--embed-max-batch`` (0: the ``--max-batch`` argument) and
``--embed-workers`` (0: the node's default): each request alone on one embedding thread (the
node before batching, the figures' baseline); the node as it ships; and, reported only, the
merging without the second thread and the second thread without the merging."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__)
    p.add_argument("--callers", type=int, default=int(HIGH), help="the loaded phase's callers")
    p.add_argument("--max-batch", type=int, default=64, help="the batched node's max batch")
    p.add_argument("--rounds", type=int, default=2, help="turns of the modes")
    p.add_argument("--low-warmup-s", type=float, default=2.0, help="per round and mode")
    p.add_argument("--low-window-s", type=float, default=12.0, help="per round and mode")
    p.add_argument("--high-warmup-s", type=float, default=3.0, help="per round and mode")
    p.add_argument("--high-window-s", type=float, default=12.0, help="per round and mode")
    p.add_argument("--seed", type=int, default=1, help="seeds the texts")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--run-dir", type=Path, default=SCRATCH_DIR / "embed", help="logs, etcd")
    return p.parse_args(argv)


async def measure(
    nodes: dict[str, RunningNode], args: argparse.Namespace, texts: list[str]
) -> dict[str, dict[str, Any]]:
    """Per mode, the low-load and the loaded phase, summed over ``--rounds`` rounds in which
    the modes take turns phase by phase (all nodes run throughout; those not called idle),
    so that other work on the machine weighs on both alike; with the forwards each node ran."""
    plan = (
        (LOW, 1, args.low_warmup_s, args.low_window_s),
        (HIGH, args.callers, args.high_warmup_s, args.high_window_s),
    )
    phases = {(m, key): Phase(callers) for m in nodes for key, callers, _, _ in plan}
    forwards = {k: [0.0, 0.0] for k in phases}
    for n in range(args.rounds):
        for key, _, warmup_s, window_s in plan:
            for mode, node in nodes.items():
                before = await asyncio.to_thread(node.batch_sizes)
                phase = phases[mode, key]
                await closed_loop(node.address, texts, warmup_s, window_s, phase)
                after = await asyncio.to_thread(node.batch_sizes)
                for i in (0, 1):
                    forwards[mode, key][i] += after[i] - before[i]
                print(f"  round {n + 1} {mode}, {phase.callers} callers: {len(phase.latencies_s)}")
    out: dict[str, dict[str, Any]] = {mode: {} for mode in nodes}
    for (mode, key), phase in phases.items():
        count, total = forwards[mode, key]
        out[mode][key] = {
            **phase.summary(),
            "forwards": count,  # the warm-ups' included
            "mean_texts_per_forward": total / count if count else float("nan"),
        }
    return out


def run(etcd: str, args: argparse.Namespace) -> dict[str, Any]:
    """The nodes, the measurements and who used the CPUs meanwhile (read once the nodes
    stopped); an ``error`` entry per mode if the run failed."""
    meter = CpuMeter()
    began = time.monotonic()
    texts = sentences(TEXTS, args.seed, WORDS)
    batches = {name: max_batch or args.max_batch for name, (max_batch, _) in MODES.items()}
    workers = {
        name: w or default_workers("cpu", beside_generator=False) for name, (_, w) in MODES.items()
    }
    try:
        with contextlib.ExitStack() as stack:
            nodes = {
                name: stack.enter_context(
                    embedding_node(args.run_dir, etcd, name, batches[name], workers[name])
                )
                for name in MODES
            }
            serving = round(time.monotonic() - began, 1)
            measured = asyncio.run(measure(nodes, args, texts))
    except Exception as exc:  # the report says what failed
        error = f"{type(exc).__name__}: {exc}"
        return {
            name: {"error": error, "max_batch": batches[name], "workers": workers[name]}
            for name in MODES
        }
    cpu = meter.figures()
    wall = round(time.monotonic() - began, 1)
    timeline = [{"t_s": 0, "event": "nodes started"}, {"t_s": serving, "event": "serving"}]
    return {
        name: {
            "max_batch": batches[name],
            "workers": workers[name],
            "phases": measured[name],
            "cpu": cpu,  # the whole run's: the modes took turns
            "log": str(args.run_dir / f"{name}.log"),
            "wall_s": wall,
            "timeline": timeline,
        }
        for name in batches
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = [round(x, 2) for x in os.getloadavg()]
    shutil.rmtree(args.run_dir, ignore_errors=True)
    args.run_dir.mkdir(parents=True)
    etcd = etcd_process(args.run_dir / "etcd-data", args.run_dir / "etcd.log", HOST).start()
    try:
        experiments = run(etcd.address, args)
    finally:
        etcd.stop()
    doc: dict[str, Any] = {
        "figures": rows(experiments),
        "experiments": experiments,
        "setup": {
            "command": "python -m bench.embed",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": MODEL,
            "path": "node directly over gRPC (no scheduler)",
            "texts": TEXTS,
            "words": list(WORDS),
            "tenants": len(TENANTS),
            "callers": args.callers,
            "rounds": args.rounds,
            "max_batch": args.max_batch,
            "default_workers": default_workers("cpu", beside_generator=False),
            "low_warmup_s": args.low_warmup_s,
            "low_window_s": args.low_window_s,
            "high_warmup_s": args.high_warmup_s,
            "high_window_s": args.high_window_s,
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "load_average_start_end": [load, [round(x, 2) for x in os.getloadavg()]],
        },
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "embed.json").write_text(json.dumps(finite(doc), indent=2) + "\n")
    (args.out_dir / "embed.md").write_text(markdown(doc))
    for r in doc["figures"]:
        print(f"{r['figure']}: {r['measured']} vs {r['baseline']} = {r['ratio']} ({r['target']})")
    print(f"results in {args.out_dir / 'embed.json'} and {args.out_dir / 'embed.md'}")
    return 0
