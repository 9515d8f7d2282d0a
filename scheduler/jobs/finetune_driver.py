"""One fine-tune job driven to its end by the replica holding its driver entry.

The driver loops until the job is final:

1. **trained?** when a node already wrote the adapter (``ft_trained``): register it
   (:class:`~scheduler.adapters.AdapterRecord` in etcd) and complete the job, even when a
   cancel or the window's end came after the adapter: it exists and holds the name, so it is
   served rather than left unregistered (the name then could never be used again).
   Registration happens before COMPLETED, so a COMPLETED job's adapter is always servable.
2. **stop?** CANCELLING → CANCELLED; window closed → EXPIRED; already final → done (both
   refused by Redis once the adapter was written: back to 1).
3. **too many failures?** the driver entry's delivery count (attempts since the last new
   checkpoint, takeovers included) above ``finetune_max_deliveries`` → FAILED with the last
   error.
4. **place** it (:func:`~scheduler.jobs.finetune_policy.choose_node`); none free: wait (0.5 s,
   or a poke).
5. **train**: ``Node.Train`` with the spec and every example; each ``step`` is stored once as
   a result keyed by its step (a resumed node sends the steps its checkpoint remembers
   again, filling in any the last call missed), ``progress`` and ``checkpoint_step`` update
   the job's
   record (GetJob's ``training``, WatchJob's events; the first event makes it RUNNING),
   ``adapter`` is kept (``ft_trained``) before anything else. Meanwhile the job's state is
   read every 0.5 s (and on a poke): a cancel or the window's end cancels the call (the node
   stops after its current unit); so does silence longer than ``finetune_stall_seconds``,
   and so does losing the driver entry (below). However the call's watch ends (the job went
   final, the reader died on Redis), the call is cancelled: the node never trains for a
   driver that stopped listening.
6. **after a failure**: as :mod:`scheduler.jobs.finetune_outcomes` classifies it: busy,
   draining, a node that cannot train it, or the stores unavailable → that node avoided, not
   counted; the job at fault → FAILED at once; anything else (a broken stream, a dead node,
   a stall) → avoided, counted, then placed again: the next node resumes from the job's
   latest checkpoint in the fleet's store.

One driver per job: the entry is held by one consumer at a time, and every write that keeps
or counts it checks that this replica still holds it (``FT_KEEP``). Every heartbeat of the
entry (the runner's, or the driver's own check every ``job_heartbeat_seconds`` while it
trains) extends a lease: another replica can take the entry over only once it has been idle
``job_reclaim_idle_seconds``, so while Redis cannot tell who holds it the driver goes on until
that bound, less one heartbeat, has passed since the last heartbeat Redis confirmed; then it
cancels its call and stops, as when it learns that another replica took the entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import grpc
import structlog
from redis.exceptions import RedisError

from scheduler.adapters import AdapterRecord
from scheduler.config import SchedulerSettings
from scheduler.jobs.finetune_outcomes import Outcome, classify, progress_fields, stop_reason
from scheduler.jobs.finetune_store import LAST_ERROR_FIELD, TRAINED_FIELD, FinetuneStore
from scheduler.jobs.metrics import FinetuneMetrics
from scheduler.jobs.model import JobRecord
from scheduler.jobs.outcomes import persist
from scheduler.jobs.store import Delivery, JobStore, now_ms
from scheduler.node_handle import NodeHandle
from sluice.contract import REQUEST_ID_METADATA
from sluice.runtime.waits import wait_event
from sluice.v1 import jobs_pb2, node_pb2

log = structlog.get_logger(__name__)

WATCH_S = 0.5
"""How often a driver reads its job's state while its node trains."""
REGISTER_TRIES = 20
LOST = "lost"
"""A driver's stop reason when another replica took its entry over (or may have)."""
NOT_COUNTED = {
    "busy": "node_busy",
    "draining": "node_draining",
    "unsuitable": "node_unsuitable",
    "store": "store_unavailable",
}
"""Outcomes that move a job without counting an attempt, and their moves label."""


@dataclass
class DriverContext:
    """What every driver of one replica shares."""

    store: JobStore
    ft: FinetuneStore
    settings: SchedulerSettings
    metrics: FinetuneMetrics
    consumer: str
    register: Callable[[AdapterRecord], Awaitable[None]]
    """Write an adapter's record to etcd."""
    place: Callable[[str, str, dict[str, float]], str | None]
    """``(job_id, base_model, avoid)`` → the node to train on, or None."""
    node: Callable[[str], NodeHandle | None]
    """A node by id."""
    training: dict[str, str] = field(default_factory=dict)
    """Job id → the node its Train call is open on, for this replica's drivers."""
    specs: dict[str, jobs_pb2.FinetuneSpec] = field(default_factory=dict)

    async def spec(self, job_id: str) -> jobs_pb2.FinetuneSpec | None:
        """A job's spec (cached: it never changes)."""
        spec = self.specs.get(job_id)
        if spec is None:
            spec = await self.ft.spec(job_id)
            if spec is not None:
                self.specs[job_id] = spec
        return spec


@dataclass
class _Call:
    """What one Train call reported so far."""

    node_id: str
    start_checkpoint: int
    last_event: float = field(default_factory=time.monotonic)
    adapter: node_pb2.TrainedAdapter | None = None
    stopped: str = ""
    stalled: bool = False
    progressed: bool = False


class FinetuneDriver:
    """Drives one fine-tune job (see the module docstring)."""

    def __init__(self, ctx: DriverContext, delivery: Delivery, record: JobRecord) -> None:
        self.ctx = ctx
        self.delivery = delivery
        self.job_id = delivery.job_id
        self.tenant = record.tenant
        self.attempts = delivery.deliveries
        self._poked = asyncio.Event()
        self._avoid: dict[str, float] = {}
        self._last_error = ""
        self._examples: list[jobs_pb2.TrainingExample] | None = None
        self._lease_end = 0.0
        settings = ctx.settings
        # The lease ends this long before another replica may take the entry over.
        self._margin = min(settings.job_heartbeat_seconds, settings.job_reclaim_idle_seconds / 2)
        self.confirmed(time.monotonic())  # the entry was just read or claimed

    def confirmed(self, asked: float) -> None:
        """Redis confirmed, for a request sent at ``asked`` (monotonic), that this replica
        holds the entry and reset its idle time: extend the lease (module docstring)."""
        self._lease_end = max(
            self._lease_end, asked + self.ctx.settings.job_reclaim_idle_seconds - self._margin
        )

    def poke(self) -> None:
        """Look at the job's state now (a cancel arrived)."""
        self._poked.set()

    async def run(self) -> None:
        """Drive the job until it is final (or this replica stops)."""
        spec = await persist(partial(self.ctx.spec, self.job_id))
        if spec is None:
            return
        while True:
            record = await persist(partial(self.ctx.store.get, self.job_id))
            if record is None or record.final:
                return
            if await persist(partial(self.ctx.ft.trained, self.job_id)):
                await self._complete(spec)
                return
            stop = stop_reason(record)
            if stop:
                if await self._end(stop):
                    return
                continue  # the adapter was written meanwhile: complete the job
            if self.attempts > self.ctx.settings.finetune_max_deliveries:
                await self._out_of_attempts()
                return
            node_id = self.ctx.place(self.job_id, spec.base_model, self._avoid)
            node = self.ctx.node(node_id) if node_id else None
            if node is None:
                await self._wait_for_node(record)
                continue
            self.ctx.training[self.job_id] = node.node_id
            try:
                outcome = await self._attempt(node, record, spec)
            finally:
                self.ctx.training.pop(self.job_id, None)
            if not await self._after(outcome, node.node_id, spec):
                return

    async def _wait_for_node(self, record: JobRecord) -> None:
        if record.train_node:
            await persist(lambda: self.ctx.ft.record(self.job_id, {"train_node": ""}))
        await self._pause(WATCH_S)

    async def _pause(self, seconds: float) -> None:
        self._poked.clear()
        await wait_event(self._poked, seconds)

    async def _after(self, outcome: Outcome, node_id: str, spec: jobs_pb2.FinetuneSpec) -> bool:
        """Act on a Train call's outcome; False when the job is done with."""
        now = time.monotonic()
        settings = self.ctx.settings
        moves = self.ctx.metrics.moves
        if outcome.kind == "trained":
            await self._complete(spec)
            return False
        if outcome.kind == "stopped":
            if outcome.message == LOST:
                log.warning("finetune_driver_superseded", job_id=self.job_id, node_id=node_id)
                return False  # another replica drives it now: touch nothing
            return True  # the loop's first check ends it
        if outcome.kind == "permanent":
            await self._fail(f"training refused: {outcome.message}")
            return False
        log.warning("finetune_moved", job_id=self.job_id, node_id=node_id, why=outcome.message)
        if outcome.kind == "busy":
            self._avoid[node_id] = now + max(outcome.retry_after_s, 0.1)
        else:
            self._avoid[node_id] = now + settings.finetune_avoid_node_seconds
        if outcome.kind in NOT_COUNTED:
            moves.labels(NOT_COUNTED[outcome.kind]).inc()
            if outcome.kind == "store":
                self._last_error = outcome.message
                error = {LAST_ERROR_FIELD: outcome.message[:1000]}
                await persist(lambda: self.ctx.ft.record(self.job_id, error))
            return True
        moves.labels("stalled" if outcome.kind == "stalled" else "node_failed").inc()
        self._last_error = outcome.message
        entry = self.delivery.entry_id
        count = await persist(partial(self.ctx.ft.redeliver, self.job_id, self.ctx.consumer, entry))
        self.attempts = count or self.attempts + 1
        fields = {LAST_ERROR_FIELD: outcome.message[:1000], "train_node": ""}
        await persist(lambda: self.ctx.ft.record(self.job_id, fields))
        await self._pause(min(5.0, 0.25 * 2**self.attempts))
        return True

    async def _attempt(
        self, node: NodeHandle, record: JobRecord, spec: jobs_pb2.FinetuneSpec
    ) -> Outcome:
        """One Train call on ``node``, watched (see the module docstring)."""
        if not await self._still_mine(bounded=False):  # no call open yet: Redis decides
            return Outcome("stopped", LOST)
        if self._examples is None:
            self._examples = await persist(partial(self.ctx.ft.examples, self.job_id))
        request = node_pb2.NodeTrainRequest(
            job_id=self.job_id, tenant=self.tenant, spec=spec, examples=self._examples
        )
        left = max(0.1, (record.deadline_ms - now_ms()) / 1000)
        opened: dict[str, str | int | float] = {
            "train_node": node.node_id,
            "train_seen_ms": now_ms(),
        }
        await persist(lambda: self.ctx.ft.record(self.job_id, opened))
        log.info(
            "finetune_training", job_id=self.job_id, node_id=node.node_id, attempt=self.attempts
        )
        call = node.stub.Train(
            request, timeout=left, metadata=((REQUEST_ID_METADATA, self.job_id),)
        )
        state = _Call(node.node_id, record.checkpoint_step)
        reader = asyncio.create_task(self._read(call, state), name=f"train {self.job_id}")
        try:
            await self._watch(call, reader, state)
        finally:
            if not call.done():  # however the watch ended: nobody reads the call any more
                call.cancel()
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if state.adapter is not None:
            return Outcome("trained")
        if state.stopped:
            return Outcome("stopped", state.stopped)
        if state.stalled:
            stall = self.ctx.settings.finetune_stall_seconds
            return Outcome("stalled", f"node {node.node_id}: no event for {stall:g} s")
        if reader.cancelled():
            return Outcome("failed", f"node {node.node_id}: the Train call was cancelled")
        exc = reader.exception()
        if exc is None:
            return Outcome("failed", f"node {node.node_id}: training ended without an adapter")
        if isinstance(exc, grpc.aio.AioRpcError):
            return classify(exc, node.node_id)
        raise exc

    async def _watch(
        self, call: grpc.aio.UnaryStreamCall, reader: asyncio.Task[None], state: _Call
    ) -> None:
        """Until the call ends: read the job's state every WATCH_S (or when poked), check
        the entry every heartbeat; cancel the call on a stop, a stall or a lost entry."""
        settings = self.ctx.settings
        next_check = time.monotonic() + settings.job_heartbeat_seconds
        while not reader.done():
            self._poked.clear()
            poked = asyncio.create_task(self._poked.wait())
            now = time.monotonic()
            wait = max(0.0, min(WATCH_S, next_check - now, self._lease_end - now))
            try:
                await asyncio.wait({reader, poked}, timeout=wait)
            finally:
                poked.cancel()
            if reader.done():
                return
            stop = ""
            with contextlib.suppress(Exception):  # Redis away: the reader's writes wait too
                async with asyncio.timeout(self._within_lease(WATCH_S)):
                    stop = stop_reason(await self.ctx.store.get(self.job_id))
            now = time.monotonic()
            if not stop and (now >= next_check or now >= self._lease_end):
                next_check = now + settings.job_heartbeat_seconds
                stop = "" if await self._still_mine() else LOST
            if not stop and time.monotonic() - state.last_event > settings.finetune_stall_seconds:
                state.stalled = True
                call.cancel()
                return
            if stop:
                state.stopped = stop
                call.cancel()
                return

    async def _still_mine(self, bounded: bool = True) -> bool:
        """Whether this replica still holds the driver entry, resetting its idle time when it
        does: one whose heartbeat lapsed (a partition from Redis, a frozen loop) may have
        been taken over, and two drivers must not train one job. While Redis cannot tell,
        true until the lease runs out (module docstring); a late check that Redis answers
        decides alone, if it answers before half the lease's margin has passed past its end
        (``bounded``; else within a heartbeat)."""
        asked, wait = time.monotonic(), self.ctx.settings.job_heartbeat_seconds
        try:
            async with asyncio.timeout(self._within_lease(wait) if bounded else wait):
                held = await self.ctx.ft.keep(
                    self.job_id, self.ctx.consumer, self.delivery.entry_id
                )
        except (RedisError, TimeoutError):
            return time.monotonic() < self._lease_end
        if held > 0:
            self.confirmed(asked)
        return held != 0  # -1: the job went final (the loop ends it)

    def _within_lease(self, wait_s: float) -> float:
        """How long a Redis request of a driver whose call is open may wait: ``wait_s``, but
        not past half the lease's margin after its end, so a partition stops the call before
        another replica may take the entry over, not a timeout later."""
        return min(wait_s, max(0.0, self._lease_end + self._margin / 2 - time.monotonic()))

    async def _read(self, call: grpc.aio.UnaryStreamCall, state: _Call) -> None:
        """Record every event of the call (see the module docstring)."""
        ft = self.ctx.ft
        async for event in call:
            state.last_event = time.monotonic()
            kind = event.WhichOneof("event")
            step: jobs_pb2.TrainingStep | None = None
            fields: dict[str, str | int | float] = {
                "train_seen_ms": now_ms(),
                "train_node": state.node_id,
            }
            if kind == "step":  # stored once; the progress after it moves the job's fields
                step = event.step  # (a resumed node first sends older steps again)
            elif kind == "progress":
                fields.update(progress_fields(event.progress, state.node_id))
            elif kind == "checkpoint_step":
                fields["checkpoint_step"] = event.checkpoint_step
            elif kind == "adapter":
                fields[TRAINED_FIELD] = event.adapter.path
            code = await persist(
                partial(
                    ft.record, self.job_id, fields, step=step, attempt=self.attempts, started=True
                )
            )
            if code == 0:  # the job went final meanwhile
                state.stopped = "final"
                return
            if step is not None and code == 1:
                self.ctx.metrics.steps.inc()
                self.ctx.metrics.tokens.inc(max(0, step.tokens))
            if kind == "checkpoint_step" and event.checkpoint_step > state.start_checkpoint:
                await self._progressed(state)
            if kind == "adapter":
                state.adapter = event.adapter

    async def _progressed(self, state: _Call) -> None:
        """A new checkpoint: attempts count from 1 again."""
        if state.progressed:
            return
        state.progressed = True
        entry = self.delivery.entry_id
        await persist(partial(self.ctx.ft.reset_attempts, self.job_id, self.ctx.consumer, entry))
        self.attempts = 1

    async def _complete(self, spec: jobs_pb2.FinetuneSpec) -> None:
        """Register the trained adapter, then mark the job COMPLETED, also when a cancel or
        the window's end came after the node wrote it (module docstring); nothing when the
        job is already final."""
        record = await persist(partial(self.ctx.store.get, self.job_id))
        if record is None or record.final:
            return
        adapter = AdapterRecord(
            tenant=self.tenant,
            base_model=spec.base_model,
            name=spec.adapter_name,
            shared=spec.shared,
            job_id=self.job_id,
            created_ms=now_ms(),
        )
        await self._register(adapter)
        entry = self.delivery.entry_id
        done = await persist(partial(self.ctx.ft.complete, self.job_id, entry, adapter.served_as))
        if done:
            self.ctx.metrics.jobs.labels("completed").inc()
            log.info(
                "finetune_completed",
                job_id=self.job_id,
                tenant=self.tenant,
                adapter=adapter.served_as,
                steps=record.train_step,
            )

    async def _register(self, adapter: AdapterRecord) -> None:
        """Write the adapter's record to etcd, retried while etcd is away (~20 s); raises
        after (the job is taken over and registered later)."""
        for attempt in range(REGISTER_TRIES):
            try:
                await self.ctx.register(adapter)
                return
            except Exception as exc:
                if attempt == REGISTER_TRIES - 1:
                    raise
                log.warning("adapter_register_failed", job_id=self.job_id, error=str(exc))
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))

    async def _end(self, stop: str) -> bool:
        """Finalize a job that must stop: CANCELLED or EXPIRED (nothing when already final);
        False when Redis refused because the adapter was written (the job completes)."""
        if stop == "final" or not stop:
            return True
        await persist(lambda: self.ctx.ft.record(self.job_id, {"train_node": ""}))
        target = jobs_pb2.JOB_STATE_CANCELLED if stop == "cancelled" else jobs_pb2.JOB_STATE_EXPIRED
        code, state = await persist(partial(self.ctx.ft.stop, self.job_id, target))
        if code == 1:
            label = "expired" if state == jobs_pb2.JOB_STATE_EXPIRED else "cancelled"
            self.ctx.metrics.jobs.labels(label).inc()
            log.info("finetune_ended", job_id=self.job_id, state=label)
        return code != 2

    async def _fail(self, message: str) -> None:
        """FAILED with ``message``."""
        if await persist(partial(self.ctx.ft.fail, self.job_id, message)):
            self.ctx.metrics.jobs.labels("failed").inc()
            log.warning("finetune_failed", job_id=self.job_id, error=message)

    async def _out_of_attempts(self) -> None:
        limit = self.ctx.settings.finetune_max_deliveries
        last = self._last_error or await persist(partial(self.ctx.ft.last_error, self.job_id))
        last = last or "its driver's replica died each time"
        await self._fail(f"training failed {limit} times in a row without a new checkpoint: {last}")
