"""The suite each experiment runs on: :class:`bench.chaos.suite.ChaosSuite` (``sluice up``'s
secure supervisor, two nodes of the tiny model), supervised as ``sluice up`` supervises it
(crashed children and stores restarted), every scheduler given the benchmark's jobs settings
as command-line flags (:class:`JobSettings`): the supervisor's scheduler is restarted once with
them before the experiment (its restarts after a crash keep them: the supervisor restarts a
child with its command line), a second replica is started with them here. The supervisor
passes its children none of this process's ``SLUICE_*`` variables, so flags are the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.chaos.load import Clock
from bench.chaos.suite import HOST, SCHEDULER, ChaosSuite, Extra
from bench.jobs.metrics import Samples, scrape
from sluice.local.stores import environment_without_proxies, free_port
from sluice.local.up import wait_serving

NODES = ("node-1", "node-2")


@dataclass(frozen=True)
class JobSettings:
    """The schedulers' jobs settings the benchmark changes (everything else: defaults)."""

    reclaim_idle_s: float = 5.0
    """``job_reclaim_idle_seconds`` (default 30 s): a dead replica's lines are taken over after
    this long, so a run with two kills does not wait minutes for them."""
    heartbeat_s: float = 1.0
    """``job_heartbeat_seconds`` (default 5 s): below the reclaim bound, so a live replica's
    lines are never taken over."""

    def flags(self) -> list[str]:
        """The settings as the scheduler's command-line flags."""
        return [
            "--job-reclaim-idle-seconds", f"{self.reclaim_idle_s:g}",
            "--job-heartbeat-seconds", f"{self.heartbeat_s:g}",
        ]  # fmt: skip


def with_flags(argv: list[str], flags: list[str]) -> list[str]:
    """``argv`` with ``flags`` (``--name value`` pairs) set, replacing earlier values."""
    names = set(flags[::2])
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        else:
            out.append(arg)
    return [*out, *flags]


def restart_child(
    suite: ChaosSuite, name: str, flags: list[str], timeout_s: float, stop_s: float | None = None
) -> None:
    """Restart the supervisor's child ``name`` with ``flags`` added to its command line
    (blocking; unsupervised, so the supervisor never sees the stop): stopped (killed after
    ``stop_s``, by default ``timeout_s``), started again, waited for until it serves."""
    child = suite.child(name)
    child.argv = with_flags(child.argv, flags)
    child.proc.terminate()
    try:
        child.proc.wait(timeout_s if stop_s is None else stop_s)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait()
    child.respawn()
    wait_serving(
        child.address,
        child.proc,
        child.log_path,
        timeout_s,
        child.name,
        mesh=suite.mesh,
        peer=child.identity,
    )


def restart_scheduler(suite: ChaosSuite, flags: list[str], timeout_s: float = 60.0) -> None:
    """Restart the supervisor's scheduler with ``flags`` added to its command line (blocking;
    before supervision starts, so the supervisor never sees the stop)."""
    restart_child(suite, "scheduler", flags, timeout_s)
    suite.wait_nodes(set(NODES))


def start_replica(suite: ChaosSuite, name: str, flags: list[str], timeout_s: float = 60.0) -> Extra:
    """Another scheduler replica beside the suite (same etcd, Redis, cache and tenants file),
    as :meth:`ChaosSuite.start_scheduler` starts one, with ``flags`` on its command line; added
    to the suite's extras, so :meth:`ChaosSuite.stop` stops it. Returns once it serves."""
    endpoints, supervisor = suite.endpoints, suite.supervisor
    if endpoints is None or supervisor is None:
        raise RuntimeError("the suite is not started")
    port, metrics_port = free_port(HOST), free_port(HOST)
    log_path = suite.run_dir / "logs" / f"{name}.log"
    log = log_path.open("ab")
    env = environment_without_proxies()
    env.update({"SLUICE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
    env.update(supervisor.service_env(SCHEDULER, "scheduler"))  # secrets: never on argv
    argv = [
        sys.executable, "-m", "scheduler", "--host", HOST, "--port", str(port),
        "--metrics-host", HOST, "--metrics-port", str(metrics_port), "--grace-seconds", "2",
        "--etcd-endpoint", endpoints.etcd, "--tenants-file", endpoints.tenants_file,
        "--cache-address", endpoints.cache["grpc"], *flags,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    extra = Extra(name, f"{HOST}:{port}", f"{HOST}:{metrics_port}", proc, log_path, log, SCHEDULER)
    suite.extras.append(extra)
    suite.say(f"started {name} (pid {proc.pid}), log {log_path}")
    wait_serving(extra.address, proc, log_path, timeout_s, name, mesh=suite.mesh, peer=SCHEDULER)
    return extra


@dataclass(frozen=True)
class Replica:
    """A scheduler replica: where it answers, where its metrics are, its process now."""

    name: str
    address: str
    metrics: str
    pid: Callable[[], int | None]

    def scrape(self) -> Samples | None:
        """Its metrics now (None while it is down)."""
        return scrape(self.metrics)


@dataclass
class Running:
    """A started suite and what an experiment notes about it."""

    suite: ChaosSuite
    flags: list[str] = field(default_factory=list)
    """The jobs settings every scheduler of the suite runs with."""
    clock: Clock = field(default_factory=Clock)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    say: Callable[[str], None] = print

    def event(self, what: str) -> float:
        """Note ``what`` on the experiment's clock; returns its time."""
        now = round(self.clock.now(), 2)
        self.timeline.append((now, what))
        self.say(f"{now:7.2f} s  {what}")
        return now

    def replica(self) -> Replica:
        """The supervisor's scheduler."""
        suite = self.suite
        endpoints = suite.endpoints
        assert endpoints is not None

        def pid() -> int | None:
            proc = suite.child("scheduler").proc
            return proc.pid if proc.poll() is None else None

        return Replica("scheduler", suite.scheduler, endpoints.scheduler["metrics"], pid)

    async def second_replica(self, name: str = "scheduler-2") -> Replica:
        """Start another scheduler replica (same stores, nodes, tenants, jobs settings);
        returns once it serves and sees both nodes."""
        extra = await asyncio.to_thread(start_replica, self.suite, name, self.flags)
        await asyncio.to_thread(self.suite.wait_nodes, set(NODES), extra.address)

        def pid() -> int | None:
            return extra.proc.pid if extra.proc.poll() is None else None

        return Replica(name, extra.address, extra.metrics_address, pid)

    def node_metrics(self) -> list[str]:
        """The nodes' metrics addresses."""
        assert self.suite.endpoints is not None
        return [n["metrics"] for n in self.suite.endpoints.nodes]


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (``/proc/stat``, every core)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the suite, once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class CpuMeter:
    """Who used the machine's CPUs over an experiment: this process and the suite it started
    (its children, counted once reaped: read after the suite stopped) against the whole machine
    (``/proc/stat``); the rest is other processes sharing the machine, which slow the nodes
    (they run at nice 10) and make the figures noisy."""

    started: float = field(default_factory=time.monotonic)
    machine: float | None = field(default_factory=_machine_busy_s)
    own: float = field(default_factory=_own_cpu_s)

    def own_cpu_s(self) -> float:
        """The CPU seconds counted as ours now (``own`` is their value when the meter was
        made)."""
        return _own_cpu_s()

    def figures(self) -> dict[str, float | None]:
        """CPU seconds since the meter was made: available, machine busy, ours, others'."""
        wall = time.monotonic() - self.started
        cores = os.cpu_count() or 1
        busy_now = _machine_busy_s()
        own = max(0.0, self.own_cpu_s() - self.own)
        busy = None if busy_now is None or self.machine is None else busy_now - self.machine
        others = None if busy is None else max(0.0, busy - own)
        return {
            "available_s": round(wall * cores, 1),
            "machine_busy_s": None if busy is None else round(busy, 1),
            "suite_and_bench_s": round(own, 1),
            "other_processes_s": None if others is None else round(others, 1),
            "other_processes_share": None if others is None else round(others / (wall * cores), 3),
        }


@contextlib.asynccontextmanager
async def running(
    run_dir: Path, settings: JobSettings, say: Callable[[str], None] = print
) -> AsyncIterator[Running]:
    """A fresh suite in ``run_dir`` (emptied first), supervised while the block runs, then
    stopped (every process by its PID), on errors too."""
    shutil.rmtree(run_dir, ignore_errors=True)
    suite = ChaosSuite(run_dir, say=lambda m: say(f"  {m}"))
    supervising: asyncio.Task[None] | None = None
    flags = settings.flags()
    try:
        await asyncio.to_thread(suite.start)
        await asyncio.to_thread(suite.wait_nodes, set(NODES))
        await asyncio.to_thread(restart_scheduler, suite, flags)
        supervising = asyncio.create_task(suite.supervise())
        yield Running(suite, flags, say=say)
    finally:
        if supervising is not None:
            supervising.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervising
        await asyncio.to_thread(suite.stop)
