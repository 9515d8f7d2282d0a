"""Experiment 1, *nothing lost*: one job on two scheduler replicas, faults while it runs.

The job (``lines`` lines of ``line_tokens`` tokens) is submitted to the second replica (started
here), which also answers every read; the supervisor's replica is the one killed. Faults go in
as the job progresses (fractions of its lines done, so a faster or slower machine sees the same
experiment):

1. at 15 %: SIGKILL the supervisor's scheduler while it holds lines; the supervisor restarts
   it (checked: a new PID serving again);
2. at 40 %: the same again, once it holds lines again;
3. at 65 %: SIGKILL Redis; the supervisor restarts it on the same port and data directory
   (checked; the harness would restart it after 15 s and say so).

Then the job must complete, every ``custom_id`` have exactly one result, and the lines computed
more than once are counted (:mod:`bench.jobs.figures`). Each replica's counters are read every
0.5 s and right before each kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.chaos.suite import OTHERS
from bench.jobs import logs as job_logs
from bench.jobs.calls import FINAL_STATES, Caller, job_lines
from bench.jobs.figures import ResultRow, exactly_once, recomputed
from bench.jobs.metrics import IncarnationCounters, scrape, total
from bench.jobs.suite import NODES, Replica, Running
from sluice.v1 import jobs_pb2

TENANT = OTHERS[0]
REPLICAS = ("scheduler", "scheduler-2")
RECLAIMED = "job_line_reclaimed"
REGENERATED = "job_line_regenerated"
LINE_COUNTERS = (
    "duplicate",
    "reclaimed",
    "reattached",
    "regenerated",
    "completed",
    "deferred",
    "failed",
    "dead_lettered",
)


@dataclass(frozen=True)
class LostOptions:
    """Size of the job and of the waits."""

    lines: int = 2000
    line_tokens: int = 32
    kill_at: tuple[float, float] = (0.15, 0.40)
    redis_at: float = 0.65
    hold_wait_s: float = 10.0
    """Longest wait for the replica to hold lines before a kill (killed anyway after)."""
    restart_wait_s: float = 15.0
    """Longest wait for the supervisor to restart a killed process."""
    job_timeout_s: float = 240.0


async def _kill(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None or proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(proc.wait, 5)
    return proc.pid


class Watch:
    """Reads the replicas' job-line counters every 0.5 s (and on demand)."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.counters = IncarnationCounters()
        self.in_flight: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def read(self, replica: Replica) -> None:
        """Read one replica now (nothing when it is down)."""
        pid = replica.pid()
        samples = await asyncio.to_thread(replica.scrape)
        if pid is None or samples is None or replica.pid() != pid:
            return
        name = "sluice_scheduler_job_lines_total"
        values = {c: total(samples, name, outcome=c) for c in LINE_COUNTERS}
        self.counters.observe(replica.name, pid, values)
        self.in_flight[replica.name] = total(samples, "sluice_scheduler_job_lines_in_flight")

    async def _loop(self) -> None:
        while True:
            for replica in self.replicas:
                await self.read(replica)
            await asyncio.sleep(0.5)

    def start(self) -> None:
        """Read in the background."""
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop reading, then read every replica once more."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for replica in self.replicas:
            await self.read(replica)


async def _done_fraction(caller: Caller, job_id: str) -> tuple[float, jobs_pb2.Job | None]:
    try:
        job = await caller.get(job_id)
    except grpc.aio.AioRpcError:
        return -1.0, None
    counts = job.request_counts
    done = counts.completed + counts.failed
    return done / max(1, counts.total), job


async def _wait_progress(
    caller: Caller, job_id: str, fraction: float, timeout_s: float
) -> jobs_pb2.Job | None:
    """Wait until ``fraction`` of the lines are done; the job (None: unreadable or timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, job = await _done_fraction(caller, job_id)
        if job is not None and (done >= fraction or job.state in FINAL_STATES):
            return job
        await asyncio.sleep(0.2)
    return None


async def _kill_replica(ctx: Running, watch: Watch, replica: Replica, opts: LostOptions) -> float:
    """SIGKILL the supervisor's scheduler once it holds lines; wait for its restart."""
    deadline = time.monotonic() + opts.hold_wait_s
    while time.monotonic() < deadline:
        await watch.read(replica)
        if watch.in_flight.get(replica.name, 0) > 0:
            break
        await asyncio.sleep(0.2)
    child = ctx.suite.child("scheduler")
    held = watch.in_flight.get(replica.name, 0)
    pid = await _kill(child.proc)
    at = ctx.event(f"SIGKILL scheduler (pid {pid}), holding {held:g} lines")
    while ctx.clock.now() < at + opts.restart_wait_s:
        if child.proc.pid != pid and child.proc.poll() is None:
            ctx.event(f"scheduler restarted by the supervisor (pid {child.proc.pid})")
            break
        await asyncio.sleep(0.1)
    else:
        child.respawn()
        ctx.event(
            f"scheduler NOT restarted by the supervisor; the harness did (pid {child.proc.pid})"
        )
    serving = functools.partial(ctx.suite.serving, child.address, child.identity)
    while not await asyncio.to_thread(serving):  # noqa: ASYNC110 - polls a port
        await asyncio.sleep(0.2)
    ctx.event("scheduler serves again")
    return at


async def _kill_redis(
    ctx: Running, caller: Caller, job_id: str, opts: LostOptions
) -> dict[str, Any]:
    """SIGKILL Redis; wait for its restart and the job readable; what it kept."""
    before = await caller.get(job_id)
    store = ctx.suite.store("redis")
    pid = await _kill(store.proc)
    at = ctx.event(f"SIGKILL redis (pid {pid}); job at {before.request_counts.completed} done")
    restarted_by = "supervisor"
    while ctx.clock.now() < at + opts.restart_wait_s:
        proc = store.proc
        if proc is not None and proc.pid != pid and proc.poll() is None:
            ctx.event(f"redis restarted by the supervisor (pid {proc.pid})")
            break
        await asyncio.sleep(0.1)
    else:
        restarted_by = "harness"
        store.respawn()
        ctx.event("redis NOT restarted by the supervisor; restarted by the harness")
    while not await asyncio.to_thread(store.ready):  # noqa: ASYNC110 - polls a port
        await asyncio.sleep(0.05)
    back = ctx.event("redis accepts connections again")
    after: jobs_pb2.Job | None = None
    while after is None and ctx.clock.now() < back + 30:
        with contextlib.suppress(grpc.aio.AioRpcError):
            after = await caller.get(job_id)
        await asyncio.sleep(0.1)
    ctx.event(f"job readable again: {after.request_counts.completed if after else '?'} done")
    return {
        "at_s": at,
        "restarted_by": restarted_by,
        "down_s": round(back - at, 2),
        "completed_before_kill": before.request_counts.completed,
        "completed_first_read_after": after.request_counts.completed if after else None,
        "job_state_after": jobs_pb2.JobState.Name(after.state) if after else None,
    }


def _node_generations(ctx: Running) -> tuple[float, list[int]] | None:
    """Generations the nodes ended so far (any finish reason) and their PIDs; None when a
    node cannot be read."""
    reads = [scrape(address) for address in ctx.node_metrics()]
    if any(r is None for r in reads):
        return None
    value = sum(total(r, "sluice_node_requests_total") for r in reads if r is not None)
    return value, [ctx.suite.child(n).proc.pid for n in NODES]


@dataclass
class Outcome:
    """What the job went through and what was read back."""

    job_id: str = ""
    final: jobs_pb2.Job | None = None
    faults: dict[str, Any] = field(default_factory=dict)
    """Fault name → its time on the clock (a replica kill) or its figures (Redis)."""
    paged: list[jobs_pb2.JobResult] = field(default_factory=list)
    by_id: list[jobs_pb2.JobResult] = field(default_factory=list)


async def _run_job(
    ctx: Running,
    caller: Caller,
    watch: Watch,
    lines: list[jobs_pb2.JobLine],
    opts: LostOptions,
) -> Outcome:
    """Submit the job, inject the faults as it progresses, wait for it, read every result."""
    out = Outcome()
    submitted = await caller.submit(lines, window_s=3600)
    if submitted.job is None:
        raise RuntimeError(f"the job was refused: {submitted.refusal}")
    out.job_id = submitted.job.job_id
    ctx.event(f"job submitted ({len(lines)} lines) in {submitted.elapsed_s * 1000:.0f} ms")
    watch.start()
    for n, fraction in enumerate(opts.kill_at, 1):
        job = await _wait_progress(caller, out.job_id, fraction, opts.job_timeout_s)
        if job is None or job.state in FINAL_STATES:
            break
        out.faults[f"replica_kill_{n}"] = await _kill_replica(ctx, watch, watch.replicas[0], opts)
    job = await _wait_progress(caller, out.job_id, opts.redis_at, opts.job_timeout_s)
    if job is not None and job.state not in FINAL_STATES:
        out.faults["redis"] = await _kill_redis(ctx, caller, out.job_id, opts)
    out.final = await caller.wait_final(out.job_id, opts.job_timeout_s)
    state = jobs_pb2.JobState.Name(out.final.state) if out.final else "not final"
    ctx.event(f"job final: {state}")
    await watch.stop()
    out.paged = await caller.results(out.job_id)
    out.by_id = await caller.results_of(out.job_id, [line.custom_id for line in lines])
    return out


async def nothing_lost(ctx: Running, opts: LostOptions) -> dict[str, Any]:
    """Run experiment 1 on a started suite; its figures."""
    first = ctx.replica()
    second = await ctx.second_replica()
    ctx.clock.reset()
    ctx.event(f"two replicas serve: {first.name} (supervisor's), {second.name} (harness's)")
    caller = Caller(second.address, ctx.suite.keys[TENANT], ctx.suite.public_credentials())
    watch = Watch([first, second])
    nodes_before = await asyncio.to_thread(_node_generations, ctx)
    lines = job_lines(opts.lines, opts.line_tokens, "lost")
    try:
        out = await _run_job(ctx, caller, watch, lines, opts)
    finally:
        await watch.stop()
        await caller.close()
    nodes_after = await asyncio.to_thread(_node_generations, ctx)
    logs = ctx.suite.run_dir / "logs"
    events = job_logs.read(logs, REPLICAS, ctx.clock.origin_unix)
    final, counters = out.final, watch.counters
    extra = _extra_generations(nodes_before, nodes_after, out.paged)
    ids = [line.custom_id for line in lines]
    return {
        "lines": opts.lines,
        "line_tokens": opts.line_tokens,
        "job_state": jobs_pb2.JobState.Name(final.state) if final else None,
        "request_counts": _counts(final),
        "duration_s": (final.finished_at_unix_ms - final.created_at_unix_ms) / 1000
        if final
        else None,
        "faults_injected": len(out.faults),
        "redis": out.faults.get("redis"),
        "results": exactly_once(ids, [_row(r) for r in out.paged], [_row(r) for r in out.by_id]),
        "recomputed": recomputed(
            opts.lines,
            counters.total("duplicate"),
            (counters.total("regenerated"), sum(e.event == REGENERATED for e in events)),
            (counters.total("reclaimed"), sum(e.event == RECLAIMED for e in events)),
            counters.total("reattached"),
            extra["extra"] if extra is not None else None,
        ),
        "replica_counters": {
            f"{source} pid {pid}": values for (source, pid), values in counters.last.items()
        },
        "node_generations": extra,
        "reclaimed_after": _by_fault(events, out.faults),
        "line_tasks_crashed": {
            "count": sum(e.event == "job_line_crashed" for e in events),
            "errors": job_logs.errors(events, "job_line_crashed"),
        },
        "timeline": job_logs.timeline(ctx.timeline, logs, list(REPLICAS), ctx.clock.origin_unix),
    }


def _extra_generations(
    before: tuple[float, list[int]] | None,
    after: tuple[float, list[int]] | None,
    results: list[jobs_pb2.JobResult],
) -> dict[str, int] | None:
    """Generations the nodes ended beyond one per generated line (None when a node could not
    be read or restarted meanwhile: its counter would have started again)."""
    if before is None or after is None or before[1] != after[1]:
        return None
    ended = int(after[0] - before[0])
    generated = sum(r.WhichOneof("outcome") == "generate" for r in results)
    return {"ended": ended, "lines_generated": generated, "extra": ended - generated}


def _by_fault(events: list[job_logs.Event], faults: dict[str, Any]) -> dict[str, int]:
    """Lines reclaimed after each fault, until the next (``before_faults`` first)."""
    starts = [("before_faults", 0.0)] + [
        (name, value["at_s"] if isinstance(value, dict) else float(value))
        for name, value in faults.items()
    ]
    ends = [t for _, t in starts[1:]] + [float("inf")]
    return {
        name: job_logs.count_between(events, RECLAIMED, start, end)
        for (name, start), end in zip(starts, ends, strict=True)
    }


def _row(result: jobs_pb2.JobResult) -> ResultRow:
    return ResultRow(result.custom_id, result.WhichOneof("outcome") == "error", result.deliveries)


def _counts(job: jobs_pb2.Job | None) -> dict[str, int] | None:
    if job is None:
        return None
    c = job.request_counts
    return {
        "total": c.total,
        "completed": c.completed,
        "failed": c.failed,
        "cancelled": c.cancelled,
        "expired": c.expired,
        "dead_lettered": c.dead_lettered,
    }
