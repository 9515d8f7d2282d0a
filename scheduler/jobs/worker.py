"""The job worker of one scheduler replica: takes lines from Redis, runs each through the
same path as a public BATCH request, writes its result, and keeps what it holds alive.

Each line is a member of its job's consumer group, delivered to one replica at a time:

- **taking** (:meth:`JobWorker._take`): while the adaptive window has room, lines of the jobs
  in :func:`scheduler.jobs.planner.order` (earliest deadline first, fair across tenants) are
  read with ``XREADGROUP``;
- **running** (:meth:`JobWorker._attempt`): a :class:`~scheduler.lifecycle.GenerateFlow` or
  :class:`~scheduler.embed_flow.EmbedFlow` with the job's tenant, class and deadline: quotas,
  fair share and admission apply to lines as to any request;
- **refused for overload** (RESOURCE_EXHAUSTED, or UNAVAILABLE before a node took it): the
  line is deferred, not failed: the window halves and the line waits out RetryInfo, until its
  job's window closes;
- **failed** for a reason of the request (INVALID_ARGUMENT, PERMISSION_DENIED, ...): an error
  result; for any other reason it is delivered again (``XCLAIM``), and after
  ``job_max_deliveries`` it is dead-lettered with its last error;
- **heartbeat** (every ``job_heartbeat_seconds``): the lines held (running or deferred) are
  re-claimed by this consumer with ``JUSTID``, which resets their idle time; lines idle longer
  than ``job_reclaim_idle_seconds`` belong to a dead replica and are taken over
  (``XAUTOCLAIM``), a line past its deliveries dead-lettered;
- **expiry**: a job whose window closed is finalized EXPIRED (lines in flight end by then:
  their deadline is the job's).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

import grpc
import structlog
from redis.exceptions import RedisError

from scheduler.config import SchedulerSettings
from scheduler.embed_flow import EmbedFlow
from scheduler.jobs.attach import line_key, reattach
from scheduler.jobs.metrics import JobMetrics
from scheduler.jobs.model import RUNNABLE_STATES, JobRecord
from scheduler.jobs.outcomes import (
    Deferred,
    Failed,
    JobRate,
    Saturation,
    classify,
    line_error,
    line_result,
    persist,
)
from scheduler.jobs.planner import Backlog, LineWindow, Runnable, completions, order
from scheduler.jobs.store import Delivery, JobStore, now_ms
from scheduler.lifecycle import GenerateFlow, RequestPath
from scheduler.nodes import NodeDirectory
from sluice.contract import WorkloadClass
from sluice.runtime.errors import SluiceError
from sluice.runtime.waits import wait_event
from sluice.v1 import jobs_pb2

log = structlog.get_logger(__name__)

REFRESH_S = 0.5
LINE_STREAM_INTERVAL_MS = 1000
"""A line's answer is read whole: its node sends the first chunk at once (the line started),
then one per second, not one per token."""
SLOT_BUFFER = 0.5
"""Lines queued for the nodes beyond their free BATCH slots, as a share of those slots."""
DEFER_FLOOR_S = 0.2

T = TypeVar("T")


@dataclass
class _Progress:
    """How far one attempt of a line got."""

    admitted: bool = False
    """A node started it (its first chunk or its answer came)."""


class JobWorker:
    """Runs job lines on this replica (see the module docstring)."""

    def __init__(
        self,
        store: JobStore,
        path: RequestPath,
        settings: SchedulerSettings,
        metrics: JobMetrics,
        consumer: str,
        nodes: NodeDirectory,
    ) -> None:
        self._store = store
        self._nodes = nodes
        self._path = path
        self._settings = settings
        self._metrics = metrics
        self.consumer = consumer
        self.window = LineWindow(maximum=float(settings.job_max_lines_in_flight))
        self.rate = JobRate()
        self._saturation = Saturation()
        self.records: dict[str, JobRecord] = {}
        """The jobs not final, as last read (every 0.5 s)."""
        self._drained: set[str] = set()
        self._held: dict[tuple[str, str], Delivery] = {}
        self._started_jobs: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._next_refresh = 0.0
        self._next_upkeep = 0.0
        self._attempting = 0
        self._cursors: dict[str, str] = {}

    async def start(self) -> None:
        """Start taking lines."""
        self._loop = asyncio.create_task(self._run(), name="job worker")

    async def stop(self) -> None:
        """Stop: lines in flight are abandoned (another replica reclaims them)."""
        tasks = [t for t in (self._loop, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def capacity(self) -> float:
        """Weighted tokens per second the nodes could give jobs, before any job ran."""
        rates = [self._nodes.capacity_rate(model) for model in self._nodes.models()]
        return max(rates, default=0.0) * self._settings.job_capacity_share

    def current_rate(self) -> float:
        """The rate predictions use now."""
        return self.rate.rate(self.capacity(), time.monotonic())

    def _slot_room(self) -> int:
        """Lines that may start now by the nodes' BATCH slots: those free, less the BATCH
        requests already queued here (for any model: the models of a node share its slots),
        plus half the slots queued ahead (a slot that frees is refilled at once). A
        line taken beyond that would only wait in this replica, where a kill makes it be
        taken again; 0 or less means the jobs have more lines ready than the nodes take."""
        room: int | None = None
        queued = 0
        for model in self._nodes.models():
            queued += sum(self._path.gate.queues.waiting(WorkloadClass.BATCH, model).values())
            view = self._nodes.capacity(model, WorkloadClass.BATCH)
            if view.slots > 0:
                here = view.free + math.ceil(view.slots * SLOT_BUFFER)
                room = here if room is None else max(room, here)
        return 0 if room is None else room - queued

    def backlog(self) -> list[Backlog]:
        """The remaining work of the jobs not final."""
        return [
            Backlog(r.job_id, r.deadline_ms, r.remaining_tokens)
            for r in self.records.values()
            if r.state in RUNNABLE_STATES and r.kind != jobs_pb2.JOB_KIND_FINETUNE
        ]

    def note(self, record: JobRecord) -> None:
        """A job just committed here: counted in the backlog before the next refresh."""
        self.records[record.job_id] = record

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except RedisError as exc:
                log.warning("job_worker_redis_error", error=str(exc))
                await asyncio.sleep(1.0)
            except Exception:  # never let one bad record stop the replica's jobs
                log.exception("job_worker_error")
                await asyncio.sleep(1.0)
            self._wake.clear()
            await wait_event(self._wake, 0.2)

    async def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_refresh:
            await self._refresh()
            self._next_refresh = now + REFRESH_S
        if now >= self._next_upkeep:
            await self._upkeep()
            self._next_upkeep = now + self._settings.job_heartbeat_seconds
        await self._take(now)
        self._metrics.in_flight.set(len(self._held))
        self._metrics.window.set(self.window.size)

    async def _refresh(self) -> None:
        active = await self._store.active()
        ids = [job_id for job_id, _ in active]
        records = await self._store.records(ids)
        self.records = {r.job_id: r for r in records if r is not None}
        self._drained.clear()

    async def _take(self, now: float) -> None:
        slots, window = self._slot_room(), self.window.room(now, len(self._held))
        room = min(window, slots)
        stamp = now_ms()
        runnable = [
            Runnable(r.job_id, r.tenant, r.deadline_ms)
            for r in self.records.values()
            if r.state in RUNNABLE_STATES
            and r.kind != jobs_pb2.JOB_KIND_FINETUNE  # driven by the fine-tune runner
            and r.job_id not in self._drained
            and r.deadline_ms > stamp
        ]
        # Saturated: lines wait to be taken (this replica takes them as the nodes' room
        # allows, so lines left over mean the nodes are kept busy).
        self._saturation.tick(bool(runnable))
        if room <= 0 or not runnable:
            return
        held = Counter(
            self.records[d.job_id].tenant for d in self._held.values() if d.job_id in self.records
        )
        weights = {
            t: tenant.weight
            for t in {j.tenant for j in runnable}
            if (tenant := self._path.tenants.get(t)) is not None
        }
        per_job = max(1, -(-room // max(1, len(weights))))
        for job in order(runnable, held, weights, self.window.size):
            got = await self._store.read(job.job_id, self.consumer, min(room, per_job))
            if not got:
                self._drained.add(job.job_id)
                continue
            for delivery in got:
                self._spawn(delivery)
            room -= len(got)
            if room <= 0:
                return

    def _spawn(self, delivery: Delivery) -> None:
        key = (delivery.job_id, delivery.entry_id)
        if key in self._held:
            return
        self._held[key] = delivery
        task = asyncio.create_task(self._line(delivery), name=f"job line {delivery.entry_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upkeep(self) -> None:
        """Heartbeat, take over dead replicas' lines, expire jobs, update predictions."""
        if self._held:
            await self._store.touch(self.consumer, list(self._held.values()))
        stamp = now_ms()
        for record in list(self.records.values()):
            if record.deadline_ms <= stamp:
                changed, state = await self._store.finalize(
                    record.job_id, jobs_pb2.JOB_STATE_EXPIRED
                )
                if changed:
                    label = "expired" if state == jobs_pb2.JOB_STATE_EXPIRED else "cancelled"
                    self._metrics.jobs.labels(label).inc()
                    log.info("job_ended_by_window", job_id=record.job_id, state=state)
                continue
            if record.kind != jobs_pb2.JOB_KIND_FINETUNE:  # its runner reclaims its own
                await self._reclaim(record.job_id)
        self._started_jobs &= set(self.records)
        self._cursors = {k: v for k, v in self._cursors.items() if k in self.records}
        saturated = self._saturation.take()
        before = self.rate.value
        self.rate.observe(await self._store.settled_tokens(), time.monotonic(), saturated=saturated)
        if abs(self.rate.value - before) > 0.2 * max(before, 1.0):
            log.info("job_rate_measured", tokens_per_s=round(self.rate.value, 1))
        await self._predict(stamp)

    async def _reclaim(self, job_id: str, rounds: int = 4) -> None:
        """Take over lines of this job idle past the bound (their worker died), scanning the
        pending list from where the last pass stopped."""
        idle_ms = int(self._settings.job_reclaim_idle_seconds * 1000)
        for _ in range(rounds):
            start = self._cursors.get(job_id, "0-0")
            cursor, found = await self._store.reclaim(job_id, self.consumer, idle_ms, 16, start)
            self._cursors[job_id] = cursor
            for delivery in found:
                self._metrics.lines.labels("reclaimed").inc()
                log.info("job_line_reclaimed", job_id=job_id, line=delivery.line_number)
                self._spawn(delivery)
            if cursor == "0-0":
                return

    async def _predict(self, stamp: int) -> None:
        rate = self.current_rate()
        if rate <= 0:
            return
        for job_id, at in completions(self.backlog(), rate, stamp).items():
            record = self.records.get(job_id)
            if record is not None and abs(record.predicted_ms - at) > 1000:
                await self._store.predict(job_id, at)

    async def _line(self, delivery: Delivery) -> None:
        try:
            await self._serve(delivery)
        except asyncio.CancelledError:
            raise
        except Exception:  # left pending: reclaimed after the idle bound
            log.exception("job_line_crashed", job_id=delivery.job_id, line=delivery.line_number)
        finally:
            self._held.pop((delivery.job_id, delivery.entry_id), None)
            self._wake.set()

    async def _serve(self, delivery: Delivery) -> None:
        """Attempt the line until it has a result, or its job no longer wants it."""
        line = jobs_pb2.JobLine.FromString(delivery.body)
        limit = self._settings.job_max_deliveries
        if delivery.deliveries > limit:  # its workers kept dying
            await self._dead_letter(delivery, line)
            return
        while True:
            # Fresh: a cancel stops it now; read through a Redis restart (the line is held).
            record = await persist(partial(self._store.get, delivery.job_id))
            wanted = record is not None and record.state in RUNNABLE_STATES
            if record is None or not wanted or now_ms() >= record.deadline_ms:
                await persist(partial(self._store.settle, delivery))
                self._metrics.lines.labels("skipped").inc()
                return
            try:
                self._attempting += 1
                try:
                    result = await self._attempt(record, line, delivery)
                finally:
                    self._attempting -= 1
            except Deferred as exc:
                self.window.refused(time.monotonic(), exc.retry_after_s)
                self._metrics.lines.labels("deferred").inc()
                await self._turn(record.deadline_ms)
                continue
            except Failed as exc:
                if exc.permanent:
                    await self._finish(delivery, line, error=exc.error)
                    return
                count = await self._store.redeliver(self.consumer, delivery, exc.error)
                delivery = replace(delivery, deliveries=max(count, delivery.deliveries + 1))
                if delivery.deliveries > limit:
                    await self._finish(delivery, line, error=exc.error, dead=True)
                    return
                await asyncio.sleep(min(10.0, 0.5 * 2**delivery.deliveries))
                continue
            await self._finish(delivery, line, result=result)
            return

    async def _turn(self, deadline_ms: int) -> None:
        """Wait until a deferred line may try again: the refusal's RetryInfo waited out and
        the window has room among the lines attempting now (so deferred lines never retry as
        a flood), or its job's window closed."""
        while now_ms() < deadline_ms:
            now = time.monotonic()
            if now >= self.window.paused_until and self._attempting < int(self.window.size):
                return
            self._wake.clear()
            wait = max(DEFER_FLOOR_S, self.window.paused_until - now)
            await wait_event(self._wake, min(wait, 1.0))

    async def _dead_letter(self, delivery: Delivery, line: jobs_pb2.JobLine) -> None:
        """A line delivered more times than allowed: its last error, else why it has none."""
        error = await self._store.last_error(delivery) or jobs_pb2.LineError(
            code=grpc.StatusCode.ABORTED.value[0],
            reason="DEAD_LETTER",
            message=f"line {delivery.line_number}: delivered {delivery.deliveries - 1} times, "
            "its worker died each time",
        )
        await self._finish(delivery, line, error=error, dead=True)

    async def _attempt(
        self, record: JobRecord, line: jobs_pb2.JobLine, delivery: Delivery
    ) -> jobs_pb2.JobResult:
        """One attempt of the line; raises :class:`Deferred` or :class:`Failed`."""
        left = (record.deadline_ms - now_ms()) / 1000
        deadline = time.monotonic() + max(0.0, min(self._settings.job_line_timeout_seconds, left))
        if record.job_id not in self._started_jobs:
            self._started_jobs.add(record.job_id)
            await self._store.started(record.job_id)
        progress = _Progress()
        try:
            if line.WhichOneof("body") == "embed":
                flow = EmbedFlow(self._path, line.embed, tenant=record.tenant, deadline=deadline)
                reply = await flow.run()
                progress.admitted = True
                self.window.admitted()
                return line_result(line, delivery, embed=reply)
            key = line_key(delivery.job_id, delivery.entry_id)
            if delivery.deliveries > 1:
                attached, started = await reattach(
                    self._store, self._nodes, record.tenant, line.generate, delivery, deadline
                )
                if started:
                    self._metrics.lines.labels(
                        "regenerated" if attached is None else "reattached"
                    ).inc()
                if attached is not None:
                    return line_result(line, delivery, generate=attached)
            answer = await self._generate(record, line, delivery, deadline, key, progress)
            return line_result(line, delivery, generate=answer)
        except SluiceError as exc:
            raise classify(exc, progress.admitted, delivery.line_number) from exc
        except (asyncio.CancelledError, Deferred, Failed):
            raise
        except Exception as exc:
            raise Failed(line_error(exc, delivery.line_number), permanent=False) from exc

    async def _generate(
        self,
        record: JobRecord,
        line: jobs_pb2.JobLine,
        delivery: Delivery,
        deadline: float,
        key: str,
        progress: _Progress,
    ) -> jobs_pb2.GenerateResult:
        """Generate the line through the public path, detached on its node under ``key``; the
        node is recorded when it starts (for a replica that may take the line over)."""
        stream = GenerateFlow(
            self._path,
            line.generate,
            tenant=record.tenant,
            deadline=deadline,
            detach_key=key,
            stream_interval_ms=LINE_STREAM_INTERVAL_MS,
        )
        parts: list[str] = []
        last: jobs_pb2.GenerateResult | None = None
        async with contextlib.aclosing(stream.run()) as chunks:
            async for chunk in chunks:
                if not progress.admitted:
                    progress.admitted = True
                    self.window.admitted()
                    if chunk.node_id:
                        with contextlib.suppress(RedisError):
                            await self._store.record_node(delivery, chunk.node_id)
                parts.append(chunk.text)
                last = jobs_pb2.GenerateResult(
                    finish_reason=chunk.finish_reason,
                    usage=chunk.usage,
                    model=line.generate.model,
                )
        answer = last or jobs_pb2.GenerateResult(model=line.generate.model)
        answer.text = "".join(parts)
        return answer

    async def _finish(
        self,
        delivery: Delivery,
        line: jobs_pb2.JobLine,
        *,
        result: jobs_pb2.JobResult | None = None,
        error: jobs_pb2.LineError | None = None,
        dead: bool = False,
    ) -> None:
        if result is None:
            result = jobs_pb2.JobResult(
                custom_id=line.custom_id,
                error=error,
                deliveries=delivery.deliveries,
                line_number=delivery.line_number,
                finished_at_unix_ms=now_ms(),
            )
        ok = error is None
        body = result.SerializeToString()
        code = await persist(
            lambda: self._store.finish(delivery, line.custom_id, body, ok=ok, dead=dead)
        )
        outcome = "completed" if ok else ("dead_lettered" if dead else "failed")
        self._metrics.lines.labels("duplicate" if code == 2 else outcome).inc()
        if code == 3:
            await self._completed(delivery.job_id)
        elif code == 4:
            self._metrics.jobs.labels("cancelled").inc()

    async def _completed(self, job_id: str) -> None:
        self._metrics.jobs.labels("completed").inc()
        record = await self._store.get(job_id)
        if record is None or record.first_predicted_ms <= record.created_ms:
            return
        predicted = record.first_predicted_ms - record.created_ms
        actual = record.finished_ms - record.created_ms
        self._metrics.completion_error.observe((actual - predicted) / predicted)
        log.info(
            "job_completed",
            job_id=job_id,
            tenant=record.tenant,
            lines=record.total,
            duration_s=actual / 1000,
            predicted_s=predicted / 1000,
        )
