"""The faults, each injected into a fresh suite while the steady load runs.

A :class:`Scenario` may ``prepare`` extra processes before the load starts, ``inject`` its fault
at the fault time (returning once the fault is over, with its :class:`FaultWindow`), and
``cleanup`` what it made. Every action lands in the timeline with its time on the scenario's
clock. Nothing here repairs what the product does not: a killed child comes back only if the
supervisor restarts it, except the stores, which the scenario restarts itself when the
supervisor has not (a restart is part of the fault being healed).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from bench.chaos import strangers
from bench.chaos.figures import FaultWindow, StrangerOutcome, stranger_figures
from bench.chaos.fuzz import fuzz
from bench.chaos.load import STALL_BOUND_S, Clock, LoadSettings, Record, run_one
from bench.chaos.proxy import FaultProxy, Mode
from bench.chaos.suite import FUZZER, HOST, SCHEDULER, ChaosSuite
from sluice import AsyncClient
from sluice.local.pki import create_pki
from sluice.local.stores import free_port


@dataclass(frozen=True)
class ChaosOptions:
    """Timings of the run (CLI flags)."""

    load_s: float = 25.0
    """Least load time per scenario; longer when the fault needs it (``after_s``)."""
    fault_at_s: float = 6.0
    """When the fault is injected, after the load started."""
    after_s: float = 10.0
    """Load kept up after the fault is over (healed or injected), to see recovery."""
    grace_s: float = 10.0
    """Open requests get this long to end once the load stops; the rest are lost."""
    workers_per_tenant: int = 2
    stop_s: float = 10.0
    """How long a node stays SIGSTOPped."""
    latency_ms: float = 200.0
    latency_s: float = 6.0
    blackhole_s: float = 8.0
    store_outage_s: float = 5.0
    """How long a killed store stays down when the supervisor does not restart it."""
    fuzz_count: int = 3000
    fuzz_max_s: float = 45.0
    fuzz_seed: int = 17
    stranger_rounds: int = 3
    """Rounds of every stranger's attempt at every internal surface (135 a round with two nodes)."""
    stranger_max_s: float = 60.0
    stranger_concurrency: int = 4
    supervise: bool = True
    """Drive the supervisor's restarts (``sluice up``'s behaviour) when it has them."""
    insecure: bool = False
    """Run the suites plaintext (``sluice up --insecure``), to compare with the secure default;
    the strangers scenario cannot run then."""


@dataclass
class Context:
    """What a scenario works with."""

    suite: ChaosSuite
    clock: Clock
    options: ChaosOptions
    schedulers: list[str] = field(default_factory=list)
    """Scheduler addresses the clients use."""
    scheduler_metrics: list[str] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Scenario-specific figures (the fuzzer's)."""
    watchers: list[asyncio.Task[None]] = field(default_factory=list)
    open_streams: Callable[[], Counter[str]] = Counter
    """Streams of the load open now, by the node of their last chunk."""

    def busiest(self, nodes: Sequence[str]) -> str:
        """The node among ``nodes`` holding the most open streams (the first on a tie): a
        fault there hits streams in flight."""
        counts = self.open_streams()
        return max(nodes, key=lambda n: (counts[n], -nodes.index(n)))

    def event(self, what: str) -> float:
        """Note ``what`` in the timeline; returns its time."""
        now = round(self.clock.now(), 2)
        self.timeline.append((now, what))
        return now

    def watch_return(
        self,
        name: str,
        proc: Callable[[], subprocess.Popen[bytes] | None],
        ready: Callable[[], bool],
    ) -> None:
        """Note in the timeline when the killed ``name`` is running again (a new PID) and
        when it serves again; gives up when the scenario ends."""

        async def watch(pid: int | None) -> None:
            while True:
                current = proc()
                if current is not None and current.pid != pid and current.poll() is None:
                    self.event(f"{name} restarted by the supervisor (pid {current.pid})")
                    break
                await asyncio.sleep(0.1)
            while not await asyncio.to_thread(ready):  # noqa: ASYNC110 - polls a port
                await asyncio.sleep(0.1)
            self.event(f"{name} serves again")

        first = proc()
        self.watchers.append(asyncio.create_task(watch(first.pid if first else None)))


async def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL by PID, and reap it."""
    proc.send_signal(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(proc.wait, 5)


class Scenario:
    """One fault; subclasses set ``name`` and ``title`` and implement ``inject``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""

    async def prepare(self, ctx: Context) -> None:
        """Set up before the load starts (default: the suite's scheduler only)."""
        ctx.schedulers = [ctx.suite.scheduler]
        if ctx.suite.endpoints is not None:
            ctx.scheduler_metrics = [ctx.suite.endpoints.scheduler["metrics"]]

    async def inject(self, ctx: Context) -> FaultWindow:
        """Inject the fault; return once it is over (healed, or injected for good)."""
        raise NotImplementedError

    async def cleanup(self, ctx: Context) -> None:
        """Undo what ``prepare`` made (the suite itself is stopped by the runner)."""


NODES = ("node-1", "node-2")
"""The supervisor's nodes."""


def _unhealed(at: float, node: str | None = None) -> FaultWindow:
    return FaultWindow(at, at + STALL_BOUND_S, at, node)


class NodeKill(Scenario):
    """SIGKILL one of the two nodes with streams in flight."""

    name = "node-sigkill"
    title = "node SIGKILL"

    async def inject(self, ctx: Context) -> FaultWindow:
        node = ctx.busiest(NODES)
        child = ctx.suite.child(node)
        pid, streams = child.proc.pid, ctx.open_streams()[node]
        await _kill(child.proc)
        at = ctx.event(f"SIGKILL {node} (pid {pid}, {streams} load streams open on it)")
        ctx.watch_return(
            node, lambda: child.proc, lambda: ctx.suite.serving(child.address, child.identity)
        )
        return _unhealed(at, node)


class NodeFreeze(Scenario):
    """SIGSTOP one node for ``stop_s``, then SIGCONT (a gray failure)."""

    name = "node-sigstop"
    title = "node SIGSTOP 10 s"

    async def inject(self, ctx: Context) -> FaultWindow:
        node = ctx.busiest(NODES)
        proc = ctx.suite.child(node).proc
        streams = ctx.open_streams()[node]
        proc.send_signal(signal.SIGSTOP)
        at = ctx.event(f"SIGSTOP {node} (pid {proc.pid}, {streams} load streams open on it)")
        try:
            await asyncio.sleep(ctx.options.stop_s)
        finally:
            proc.send_signal(signal.SIGCONT)
        healed = ctx.event(f"SIGCONT {node}")
        return FaultWindow(at, healed, healed, node)


class CacheKill(Scenario):
    """SIGKILL the cache service (every request looks it up and stores into it)."""

    name = "cache-kill"
    title = "cache service SIGKILL"

    async def inject(self, ctx: Context) -> FaultWindow:
        child = ctx.suite.child("cache")
        pid = child.proc.pid
        await _kill(child.proc)
        at = ctx.event(f"SIGKILL cache (pid {pid})")
        ctx.watch_return(
            "cache", lambda: child.proc, lambda: ctx.suite.serving(child.address, child.identity)
        )
        return _unhealed(at)


class StoreKill(Scenario):
    """SIGKILL a store, then have it back on the same port and data directory: restarted by
    the supervisor if it does that, else by the scenario after ``store_outage_s`` (also when a
    supervisor has not restarted it 10 s after that)."""

    store = ""

    async def inject(self, ctx: Context) -> FaultWindow:
        store = ctx.suite.store(self.store)
        proc = store.proc
        if proc is None:
            raise RuntimeError(f"{self.store} is not running")
        pid = proc.pid
        await _kill(proc)
        at = ctx.event(f"SIGKILL {self.store} (pid {pid})")
        wait_s = ctx.options.store_outage_s + (10.0 if ctx.suite.supervised else 0.0)
        while ctx.clock.now() < at + wait_s:
            current = store.proc
            if current is not None and current.pid != pid and current.poll() is None:
                ctx.event(f"{self.store} restarted by the supervisor (pid {current.pid})")
                break
            await asyncio.sleep(0.1)
        else:
            store.respawn()
            new_pid = store.proc.pid if store.proc else None
            ctx.event(f"{self.store} restarted by the harness (pid {new_pid})")
        while not await asyncio.to_thread(store.ready):  # noqa: ASYNC110 - polls a port
            await asyncio.sleep(0.05)
        back = ctx.event(f"{self.store} accepts connections again")
        return FaultWindow(at, back, back)


class RedisKill(StoreKill):
    name = "redis-kill"
    title = "Redis SIGKILL, restarted"
    store = "redis"


class EtcdKill(StoreKill):
    name = "etcd-kill"
    title = "etcd SIGKILL, restarted"
    store = "etcd"


class ProxyFaults(Scenario):
    """A third node behind a TCP fault proxy (the scheduler reaches it only through the
    proxy): ``latency_ms`` per chunk for ``latency_s``, then black-holed for ``blackhole_s``,
    then passing again."""

    name = "proxy-latency-blackhole"
    title = "proxy: +200 ms, then black hole"
    node = "node-3"

    def __init__(self) -> None:
        self.proxy: FaultProxy | None = None

    async def prepare(self, ctx: Context) -> None:
        await super().prepare(ctx)
        port = free_port(HOST)
        self.proxy = FaultProxy(HOST, port)
        advertised = await self.proxy.start()
        await asyncio.to_thread(ctx.suite.start_node, self.node, port, advertised)
        await asyncio.to_thread(ctx.suite.wait_nodes, {"node-1", "node-2", self.node})

    async def inject(self, ctx: Context) -> FaultWindow:
        proxy = self.proxy
        if proxy is None:
            raise RuntimeError("not prepared")
        opts = ctx.options
        proxy.set_mode(Mode.LATENCY, opts.latency_ms)
        ctx.event(f"proxy to {self.node}: +{opts.latency_ms:g} ms per chunk")
        await asyncio.sleep(opts.latency_s)
        proxy.set_mode(Mode.BLACKHOLE)
        at = ctx.event(f"proxy to {self.node}: black hole")
        await asyncio.sleep(opts.blackhole_s)
        proxy.set_mode(Mode.PASS)
        healed = ctx.event(f"proxy to {self.node}: pass-through again")
        return FaultWindow(at, healed, healed, self.node)

    async def cleanup(self, ctx: Context) -> None:
        if self.proxy is not None:
            await self.proxy.stop()


class SchedulerReplicaKill(Scenario):
    """Two scheduler replicas, the clients given both; SIGKILL the supervisor's one."""

    name = "scheduler-replica-sigkill"
    title = "1 of 2 schedulers SIGKILL"

    async def prepare(self, ctx: Context) -> None:
        await super().prepare(ctx)
        second = await asyncio.to_thread(ctx.suite.start_scheduler, "scheduler-2")
        await asyncio.to_thread(ctx.suite.wait_nodes, {"node-1", "node-2"}, second.address)
        ctx.schedulers.append(second.address)
        ctx.scheduler_metrics.append(second.metrics_address)

    async def inject(self, ctx: Context) -> FaultWindow:
        child = ctx.suite.child("scheduler")
        pid = child.proc.pid
        await _kill(child.proc)
        at = ctx.event(f"SIGKILL scheduler (pid {pid}); scheduler-2 keeps running")
        ctx.watch_return(
            "scheduler",
            lambda: child.proc,
            lambda: ctx.suite.serving(child.address, child.identity),
        )
        return _unhealed(at)


class Fuzzing(Scenario):
    """The descriptor-driven fuzzer (:mod:`bench.chaos.fuzz`) against the scheduler while the
    load streams; then the suite's health and one normal request."""

    name = "fuzzer"
    title = "fuzzer (malformed/extreme public calls)"

    async def inject(self, ctx: Context) -> FaultWindow:
        opts = ctx.options
        start = ctx.event(
            f"fuzzer starts: up to {opts.fuzz_count} calls within {opts.fuzz_max_s:g} s"
        )
        result = await fuzz(
            ctx.suite.scheduler,
            ctx.suite.keys,
            FUZZER,
            count=opts.fuzz_count,
            max_s=opts.fuzz_max_s,
            seed=opts.fuzz_seed,
            credentials=ctx.suite.public_credentials(),
        )
        end = ctx.event(f"fuzzer done: {result.sent} answers in {result.elapsed_s:.1f} s")
        ctx.extra["fuzz"] = {**result.figures(), "healthy_after": await _healthy(ctx)}
        return FaultWindow(start, end, end)


async def _healthy(ctx: Context) -> dict[str, str]:
    """The scheduler's health and how one normal request of the fuzzer's tenant ends."""
    serving = await asyncio.to_thread(ctx.suite.serving, ctx.suite.scheduler, SCHEDULER, 2.0)
    record = Record(FUZZER, ctx.clock.now())
    key, tls = ctx.suite.keys[FUZZER], ctx.suite.client_tls()
    async with AsyncClient(ctx.suite.scheduler, api_key=key, retry=None, tls=tls) as c:
        await run_one(
            c,
            record,
            "a normal request after the fuzzer",
            LoadSettings(max_new_tokens=8),
            ctx.clock,
            timeout_s=30,
        )
    return {"health": "SERVING" if serving else "not SERVING", "request": record.outcome}


class Strangers(Scenario):
    """Callers without a valid client certificate, or with a valid one of the wrong identity,
    at every internal surface (nodes, cache, etcd, Redis: :mod:`bench.chaos.strangers`) while
    the load streams; the right identities' controls before and after."""

    name = "strangers"
    title = "strangers at internal ports (mTLS)"

    async def inject(self, ctx: Context) -> FaultWindow:
        suite, opts = ctx.suite, ctx.options
        lockdown = suite.supervisor.lockdown if suite.supervisor else None
        if lockdown is None or suite.endpoints is None:
            raise RuntimeError("strangers needs a secure suite (sluice up without --insecure)")
        with tempfile.TemporaryDirectory(prefix="sluice-foreign-ca-") as tmp:
            foreign = create_pki(Path(tmp), strangers.FOREIGN_IDENTITIES)
            target = strangers.Target.of(suite.endpoints, lockdown, foreign)
        attempts = strangers.catalogue(target) * opts.stranger_rounds
        before = await self._controls(target, "before")
        start = ctx.event(
            f"strangers start: {len(attempts)} attempts at "
            f"{len({a.surface for a in attempts})} internal surfaces"
        )
        outcomes, not_made = await strangers.attempt_all(
            attempts, concurrency=opts.stranger_concurrency, max_s=opts.stranger_max_s
        )
        figures = stranger_figures(
            outcomes, [*before, *await self._controls(target, "after")], not_made
        )
        end = ctx.event(
            f"strangers done: {figures['succeeded']} of {figures['attempts']} succeeded, "
            f"refused {figures['refused']}"
        )
        ctx.extra["strangers"] = figures
        return FaultWindow(start, end, end)

    @staticmethod
    async def _controls(target: strangers.Target, when: str) -> list[StrangerOutcome]:
        outcomes = [await strangers.outcome_of(a) for a in strangers.controls(target)]
        return [replace(o, surface=f"{o.surface} ({when})") for o in outcomes]
