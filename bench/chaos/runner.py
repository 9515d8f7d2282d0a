"""One scenario from start to figures: a fresh suite, the steady load and the prober, the
fault at its time, the load kept up until the fault is over plus ``after_s`` (and at least
``load_s``), the load stopped with a grace, figures computed from this run's records only,
and everything stopped — on errors too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.chaos.figures import FaultWindow, load_figures, node_figures, probe_figures, recovery
from bench.chaos.load import STALL_BOUND_S, Clock, GenerateClient, LoadSettings, Prober, SteadyLoad
from bench.chaos.logs import read_events
from bench.chaos.scenarios import (
    CacheKill,
    ChaosOptions,
    Context,
    EtcdKill,
    Fuzzing,
    NodeFreeze,
    NodeKill,
    ProxyFaults,
    RedisKill,
    Scenario,
    SchedulerReplicaKill,
    Strangers,
)
from bench.chaos.suite import ADMIN, LOAD_TENANTS, VICTIM, ChaosSuite
from bench.paths import REPO_ROOT
from sluice import AsyncClient

SCENARIOS: dict[str, type[Scenario]] = {
    s.name: s
    for s in (
        NodeKill,
        NodeFreeze,
        CacheKill,
        RedisKill,
        EtcdKill,
        Fuzzing,
        ProxyFaults,
        SchedulerReplicaKill,
        Strangers,
    )
}
"""Every scenario, in the order they run (the issue's priority)."""
RETRIES_METRIC = "sluice_scheduler_retries_total"


def scheduler_retries(metrics_address: str) -> float | None:
    """The scheduler's retries so far (every node), or None when it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(RETRIES_METRIC + "{") or line.startswith(RETRIES_METRIC + " ")
    )


def retries_between(before: list[float | None], after: list[float | None]) -> int | None:
    """Retries made during the scenario over every scheduler; a counter that went down (its
    scheduler restarted) counts from zero; None when nothing could be read."""
    total, known = 0.0, False
    for start, end in zip(before, after, strict=True):
        if end is None:
            continue
        known = True
        total += end - start if start is not None and end >= start else end
    return int(total) if known else None


async def _wait_until(clock: Clock, t: float) -> None:
    await asyncio.sleep(max(0.0, t - clock.now()))


class _Clients:
    """One SDK client per load tenant and one for the fleet (admin key), all ``retry=None``
    and trusting the suite's CA; closed at the end."""

    def __init__(self, suite: ChaosSuite, endpoints: list[str]) -> None:
        tls = suite.client_tls()
        self.clients = {
            t: AsyncClient(endpoints, api_key=suite.keys[t], retry=None, tls=tls)
            for t in LOAD_TENANTS
        }
        self.fleet = AsyncClient(endpoints, api_key=suite.keys[ADMIN], retry=None, tls=tls)

    def as_load(self) -> dict[str, GenerateClient]:
        return dict(self.clients)

    async def close(self) -> None:
        for client in [*self.clients.values(), self.fleet]:
            with contextlib.suppress(Exception):
                await client.close()


async def _drive(ctx: Context, scenario: Scenario) -> dict[str, Any]:
    """Load, fault, load, figures (the suite runs)."""
    opts = ctx.options
    expected = await asyncio.to_thread(ctx.suite.healthy_nodes)
    clients = _Clients(ctx.suite, ctx.schedulers)
    load = SteadyLoad(
        clients.as_load(), LoadSettings(workers_per_tenant=opts.workers_per_tenant), ctx.clock
    )
    prober = Prober(clients.as_load(), ctx.clock, fleet=clients.fleet)
    retries_before = [await asyncio.to_thread(scheduler_retries, m) for m in ctx.scheduler_metrics]
    try:
        ctx.clock.reset()  # t = 0: the load starts
        ctx.open_streams = lambda: Counter(
            r.nodes[-1] for r in load.records if r.end is None and r.nodes
        )
        load.start()
        prober.start()
        ctx.event("load starts")
        await _wait_until(ctx.clock, opts.fault_at_s)
        fault = await scenario.inject(ctx)
        await _wait_until(ctx.clock, max(opts.load_s, ctx.clock.now() + opts.after_s))
        ctx.event("load stops")
        await prober.stop()
        await load.stop(opts.grace_s)
        ctx.event("load stopped (grace over)")
    finally:
        await prober.stop()
        await load.stop(0)
        await clients.close()
    retries_after = [await asyncio.to_thread(scheduler_retries, m) for m in ctx.scheduler_metrics]
    _dump(ctx.suite.run_dir / "records.json", load, prober)
    return _figures(
        ctx, load, prober, fault, expected, retries_between(retries_before, retries_after)
    )


def _dump(path: Path, load: SteadyLoad, prober: Prober) -> None:
    """Every record of the scenario, for digging (beside the logs, not in the results)."""
    probes = [asdict(r) for round_ in prober.rounds for r in round_.records]
    path.write_text(json.dumps({"load": [asdict(r) for r in load.records], "probes": probes}))


def _figures(
    ctx: Context,
    load: SteadyLoad,
    prober: Prober,
    fault: FaultWindow,
    expected: list[str],
    retried: int | None,
) -> dict[str, Any]:
    now = load.stopped_at if load.stopped_at is not None else ctx.clock.now()
    probes = [r for round_ in prober.rounds for r in round_.records]
    figures = load_figures(load.records, victim=VICTIM, now=ctx.clock.now())
    figures["internal"] += sum(r.code == "INTERNAL" for r in probes)
    fuzz = ctx.extra.get("fuzz")
    if fuzz is not None:
        figures["internal"] += fuzz["internal"]
    return {
        **figures,
        "retried_elsewhere": retried,
        **node_figures(load.records, fault, ctx.clock.now()),
        "recovery": {
            **recovery(prober.rounds, fault.reference_s, expected),
            "tenants_since_injection_s": recovery(prober.rounds, fault.injected_s, expected)[
                "tenants_s"
            ],
        },
        **probe_figures(prober.rounds),
        "expected_nodes": expected,
        "fault": {
            "injected_s": fault.injected_s,
            "over_s": fault.over_s,
            "recovery_from_s": fault.reference_s,
            "node": fault.node,
        },
        "load_stopped_s": round(now, 2),
        **({"fuzz": fuzz} if fuzz is not None else {}),
        **({"strangers": ctx.extra["strangers"]} if "strangers" in ctx.extra else {}),
    }


async def run_scenario(
    name: str, options: ChaosOptions, run_root: Path, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run scenario ``name`` in a fresh suite under ``run_root/<name>``; returns its entry of
    the report (with ``error`` when the harness or the suite failed)."""
    scenario = SCENARIOS[name]()
    run_dir = run_root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    suite = ChaosSuite(run_dir, say=say, insecure=options.insecure)
    ctx = Context(suite, Clock(), options)
    shown = run_dir.relative_to(REPO_ROOT) if run_dir.is_relative_to(REPO_ROOT) else run_dir
    entry: dict[str, Any] = {"name": name, "title": scenario.title, "run_dir": str(shown)}
    supervising: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(suite.start)
        await asyncio.to_thread(suite.wait_nodes, {"node-1", "node-2"})
        await scenario.prepare(ctx)
        entry["supervised"] = suite.supervised and options.supervise
        if entry["supervised"]:
            supervising = asyncio.create_task(suite.supervise())
        entry.update(await _drive(ctx, scenario))
    except Exception as exc:  # reported in the results, not raised: the next scenario runs
        entry["error"] = f"{type(exc).__name__}: {exc}"
        say(f"{name}: {entry['error']}")
    finally:
        ended_s = ctx.clock.now()
        for task in [*ctx.watchers, *([supervising] if supervising else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await scenario.cleanup(ctx)
        await asyncio.to_thread(suite.stop)
    logs = [(n, run_dir / "logs" / f"{n}.log") for n in ("scheduler", "scheduler-2")]
    timeline = sorted(
        [*ctx.timeline, *read_events(logs, ctx.clock.origin_unix, 0.0, ended_s)], key=lambda e: e[0]
    )
    entry["timeline"] = [{"t_s": t, "event": what} for t, what in timeline]
    entry["stall_bound_s"] = STALL_BOUND_S
    return entry
