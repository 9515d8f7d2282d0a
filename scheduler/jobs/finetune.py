"""The fine-tune runner of one scheduler replica: takes fine-tune jobs, keeps them alive, takes
over those whose replica died. Each job it takes is driven by a
:class:`~scheduler.jobs.finetune_driver.FinetuneDriver` (placement, ``Node.Train``, progress,
moves, the adapter's registration).

A fine-tune job's stream holds one driver entry, delivered through the jobs' consumer group
(:mod:`scheduler.jobs.finetune_store`), so one replica at a time drives a job:

- **taking** (every tick, ~0.2 s): the QUEUED fine-tunes in tenant-fair order
  (:func:`~scheduler.jobs.finetune_policy.order_waiting`) are read with ``XREADGROUP`` while
  this replica drives fewer than ``finetune_max_jobs_per_replica`` and a node is free for the
  job's base model; a job with no free node is left for whichever replica sees one first;
- **heartbeat** (every ``job_heartbeat_seconds``): the driver entries held are re-claimed
  ``JUSTID`` (idle time reset), each only while this replica still holds it (``FT_KEEP``);
  one another replica took over is left to it and its driver poked (it stops). Entries idle
  past ``job_reclaim_idle_seconds`` belong to a dead replica and are taken over with
  ``XAUTOCLAIM`` (the delivery counts as an attempt), while this replica drives fewer than
  ``finetune_max_jobs_per_replica``;
- **expiry**: a job whose window closed is finalized EXPIRED (its driver then cancels the
  Train call), unless its adapter was written (its driver completes it);
- **stop**: drivers are cancelled with their Train calls, nothing acknowledged: another replica
  takes the jobs over and the node resumes from the last checkpoint.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import structlog
from redis.exceptions import RedisError

from scheduler.adapters import AdapterRecord
from scheduler.config import SchedulerSettings
from scheduler.jobs.finetune_driver import DriverContext, FinetuneDriver
from scheduler.jobs.finetune_policy import NodeLoad, Waiting, busy_nodes, choose_node, order_waiting
from scheduler.jobs.finetune_store import FinetuneStore
from scheduler.jobs.metrics import FinetuneMetrics
from scheduler.jobs.model import JobRecord
from scheduler.jobs.store import Delivery, JobStore, now_ms
from scheduler.nodes import NodeDirectory
from scheduler.tenants import TenantDirectory
from sluice.contract import WorkloadClass
from sluice.runtime.breaker import BreakerState
from sluice.runtime.waits import wait_event
from sluice.v1 import jobs_pb2

log = structlog.get_logger(__name__)

REFRESH_S = 1.0
TICK_S = 0.2
STATE_NAMES: dict[int, str] = {
    jobs_pb2.JOB_STATE_QUEUED: "queued",
    jobs_pb2.JOB_STATE_RUNNING: "running",
    jobs_pb2.JOB_STATE_CANCELLING: "cancelling",
}


class FinetuneRunner:
    """Drives fine-tune jobs on this replica (see the module docstring)."""

    def __init__(
        self,
        store: JobStore,
        ft: FinetuneStore,
        nodes: NodeDirectory,
        tenants: TenantDirectory,
        settings: SchedulerSettings,
        metrics: FinetuneMetrics,
        consumer: str,
        register: Callable[[AdapterRecord], Awaitable[None]],
    ) -> None:
        self._store = store
        self._nodes = nodes
        self._tenants = tenants
        self._settings = settings
        self.consumer = consumer
        self.records: dict[str, JobRecord] = {}
        """The fine-tune jobs not final, as last read."""
        self.ctx = DriverContext(
            store=store,
            ft=ft,
            settings=settings,
            metrics=metrics,
            consumer=consumer,
            register=register,
            place=self.place,
            node=nodes.get,
        )
        self._metrics = metrics
        self._held: dict[str, Delivery] = {}
        self._drivers: dict[str, FinetuneDriver] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._delivered: set[str] = set()
        """QUEUED jobs whose driver entry another replica (or this one) already holds."""
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._next_refresh = 0.0
        self._next_upkeep = 0.0

    async def start(self) -> None:
        """Start taking fine-tune jobs."""
        self._loop = asyncio.create_task(self._run(), name="finetune runner")

    async def stop(self) -> None:
        """Stop: Train calls are cancelled, driver entries left to another replica."""
        tasks = [t for t in (self._loop, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def poke(self, job_id: str) -> None:
        """Something changed for ``job_id`` (a cancel): its driver looks now."""
        driver = self._drivers.get(job_id)
        if driver is not None:
            driver.poke()
        self._wake.set()

    @property
    def driving(self) -> list[str]:
        """Ids of the jobs this replica drives now."""
        return sorted(self._held)

    def place(self, job_id: str, base_model: str, avoid: dict[str, float]) -> str | None:
        """The node ``job_id`` should train on now, or None (see
        :func:`~scheduler.jobs.finetune_policy.choose_node`)."""
        loads = [
            NodeLoad(n.node_id, n.book.sequences(), n.book.max_sequences)
            for n in self._nodes.nodes()
            if not n.draining
            and n.healthy
            and n.breaker.state is not BreakerState.OPEN
            and n.serves(base_model, WorkloadClass.FINETUNE)
        ]
        stale_ms = int(self._settings.job_reclaim_idle_seconds * 1000)
        remote = busy_nodes(
            [(r.job_id, r.train_node, r.train_seen_ms) for r in self.records.values()],
            now_ms(),
            stale_ms,
            exclude=job_id,
        )
        local = {node for other, node in self.ctx.training.items() if other != job_id}
        choice = choose_node(loads, remote | local, avoid, time.monotonic())
        return choice.node_id if choice is not None else None

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except RedisError as exc:
                log.warning("finetune_runner_redis_error", error=str(exc))
                await asyncio.sleep(1.0)
            except Exception:  # never let one bad record stop the replica's fine-tunes
                log.exception("finetune_runner_error")
                await asyncio.sleep(1.0)
            self._wake.clear()
            await wait_event(self._wake, TICK_S)

    async def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_refresh:
            await self._refresh()
            self._next_refresh = now + REFRESH_S
        if now >= self._next_upkeep:
            await self._upkeep()
            self._next_upkeep = now + self._settings.job_heartbeat_seconds
        await self._take()
        training = sum(1 for j in self._held if j in self.ctx.training)
        self._metrics.driving.labels("training").set(training)
        self._metrics.driving.labels("waiting").set(len(self._held) - training)

    async def _refresh(self) -> None:
        active = await self._store.active()
        records = await self._store.records([job_id for job_id, _ in active])
        self.records = {
            r.job_id: r for r in records if r is not None and r.kind == jobs_pb2.JOB_KIND_FINETUNE
        }
        self._delivered &= set(self.records)
        keep = set(self.records) | set(self._held)
        self.ctx.specs = {k: v for k, v in self.ctx.specs.items() if k in keep}
        states = Counter(STATE_NAMES.get(r.state, "queued") for r in self.records.values())
        for name in STATE_NAMES.values():
            self._metrics.states.labels(name).set(states.get(name, 0))

    async def _upkeep(self) -> None:
        """Heartbeat, take over dead replicas' jobs, expire jobs past their window."""
        await self._heartbeat()
        stamp = now_ms()
        idle_ms = int(self._settings.job_reclaim_idle_seconds * 1000)
        for record in list(self.records.values()):
            if record.deadline_ms <= stamp:
                code, state = await self.ctx.ft.stop(record.job_id, jobs_pb2.JOB_STATE_EXPIRED)
                if code == 1:
                    label = "expired" if state == jobs_pb2.JOB_STATE_EXPIRED else "cancelled"
                    self._metrics.jobs.labels(label).inc()
                    log.info("finetune_ended_by_window", job_id=record.job_id, state=state)
                    self.poke(record.job_id)
                continue
            if (
                record.job_id in self._held
                or len(self._held) >= self._settings.finetune_max_jobs_per_replica
            ):
                continue
            _, found = await self._store.reclaim(record.job_id, self.consumer, idle_ms, 1)
            for delivery in found:
                self._metrics.moves.labels("taken_over").inc()
                log.info("finetune_taken_over", job_id=record.job_id, attempt=delivery.deliveries)
                self._spawn(delivery, record)

    async def _heartbeat(self) -> None:
        """Reset the idle time of the driver entries this replica still holds."""
        for job_id, delivery in list(self._held.items()):
            asked = time.monotonic()
            held = await self.ctx.ft.keep(job_id, self.consumer, delivery.entry_id)
            driver = self._drivers.get(job_id)
            if driver is None:
                continue
            if held > 0:
                driver.confirmed(asked)
            elif held == 0:
                driver.poke()  # another replica holds it now: its driver stops

    async def _take(self) -> None:
        room = self._settings.finetune_max_jobs_per_replica - len(self._held)
        stamp = now_ms()
        waiting = [
            Waiting(r.job_id, r.tenant, r.deadline_ms, r.created_ms)
            for r in self.records.values()
            if r.state == jobs_pb2.JOB_STATE_QUEUED
            and r.job_id not in self._held
            and r.job_id not in self._delivered
            and r.deadline_ms > stamp
        ]
        if room <= 0 or not waiting:
            return
        training = Counter(r.tenant for r in self.records.values() if r.train_node)
        weights = {
            j.tenant: tenant.weight
            for j in waiting
            if (tenant := self._tenants.get(j.tenant)) is not None
        }
        reserved: dict[str, float] = {}
        for job in order_waiting(waiting, training, weights):
            spec = await self.ctx.spec(job.job_id)
            node = self.place(job.job_id, spec.base_model, reserved) if spec else None
            if node is None:
                continue
            got = await self._store.read(job.job_id, self.consumer, 1)
            if not got:
                self._delivered.add(job.job_id)
                continue
            reserved[node] = float("inf")  # the next job of this tick goes elsewhere
            self._spawn(got[0], self.records[job.job_id])
            room -= 1
            if room <= 0:
                return

    def _spawn(self, delivery: Delivery, record: JobRecord) -> None:
        if delivery.job_id in self._held:
            return
        self._held[delivery.job_id] = delivery
        driver = FinetuneDriver(self.ctx, delivery, record)
        self._drivers[delivery.job_id] = driver
        task = asyncio.create_task(self._drive(driver), name=f"finetune {delivery.job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drive(self, driver: FinetuneDriver) -> None:
        job_id = driver.job_id
        try:
            await driver.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # left pending: taken over after the idle bound
            log.exception("finetune_driver_crashed", job_id=job_id)
        finally:
            self._held.pop(job_id, None)
            self._drivers.pop(job_id, None)
            self.ctx.training.pop(job_id, None)
            self._wake.set()
