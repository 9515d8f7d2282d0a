"""The fine-tune driver's edges with real services (schedulers, Redis, etcd) and the scripted
``TrainingNode`` of :mod:`tests.test_finetune_jobs`: how a Train call's failure is read, an
adapter written just before a cancel or the window's end, a call nobody reads any more, a
driver entry two replicas contend for (a Redis partition injected with a TCP relay that can
be cut), and the runner's limits. Faults injected, nothing mocked."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import cast

import grpc
import pytest
import redis.asyncio as redis

from inference_node.errors import (
    ADAPTER_EXISTS,
    ADAPTER_STORE_UNAVAILABLE,
    CHECKPOINT_MISMATCH,
    CHECKPOINT_STORE_UNAVAILABLE,
    MODEL_NOT_TRAINABLE,
    NOT_FINETUNE_NODE,
    TRAINING_BUSY,
    TRAINING_MEMORY_EXCEEDED,
    AlreadyExists,
    FailedPrecondition,
)
from scheduler.config import SchedulerSettings
from scheduler.jobs.finetune_driver import DriverContext, FinetuneDriver
from scheduler.jobs.finetune_outcomes import classify, progress_fields
from scheduler.jobs.finetune_store import TRAINED_FIELD, FinetuneStore
from scheduler.jobs.model import JobKeys, JobRecord
from scheduler.jobs.store import Delivery, JobStore
from sluice.runtime.errors import (
    Internal,
    InvalidArgument,
    ResourceExhausted,
    SluiceError,
    Unavailable,
)
from sluice.v1 import jobs_pb2
from tests.harness import Suite, auth, eventually
from tests.test_finetune_jobs import (
    FAST,
    MODEL,
    Fleet,
    TrainingNode,
    adapter_in_etcd,
    finetune_nodes,
    get,
    spec,
    steps,
    submit,
    training_node,
    wait_final,
    wait_for,
)

# -- reading a failed Train call (pure) ----------------------------------------------------------


def rpc_error(error: SluiceError) -> grpc.aio.AioRpcError:
    """``error`` as the driver receives it from a node."""
    return grpc.aio.AioRpcError(
        error.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*error.trailing_metadata()),
        details=error.message,
    )


def test_a_failed_train_call_is_read_by_its_code_and_reason() -> None:
    """Busy (with its RetryInfo), draining, a node that cannot train the job, and the stores
    away move the job without counting; a taken adapter name, a foreign checkpoint and a bad
    request fail it at once with the node's message; anything else counts as a failure."""
    cases: list[tuple[SluiceError, str]] = [
        (ResourceExhausted("busy", retry_after_s=0.3, reason=TRAINING_BUSY), "busy"),
        (Unavailable("draining", reason="NODE_DRAINING"), "draining"),
        (FailedPrecondition("no pool", reason=NOT_FINETUNE_NODE), "unsuitable"),
        (FailedPrecondition("no model", reason=MODEL_NOT_TRAINABLE), "unsuitable"),
        (FailedPrecondition("too big", reason=TRAINING_MEMORY_EXCEEDED), "unsuitable"),
        (Unavailable("disk", reason=CHECKPOINT_STORE_UNAVAILABLE), "store"),
        (Unavailable("disk", reason=ADAPTER_STORE_UNAVAILABLE), "store"),
        (FailedPrecondition("seed 8", reason=CHECKPOINT_MISMATCH), "permanent"),
        (AlreadyExists("alpha/x exists", reason=ADAPTER_EXISTS), "permanent"),
        (InvalidArgument([("spec.lora.rank", "too big")]), "permanent"),
        (FailedPrecondition("something new", reason="SOMETHING_NEW"), "failed"),
        (Unavailable("stream broke"), "failed"),
        (Internal("boom"), "failed"),
    ]
    for error, kind in cases:
        outcome = classify(rpc_error(error), "ft-a")
        assert outcome.kind == kind, error
        assert outcome.message.startswith(f"node ft-a: {error.code.name}: ")
    taken = classify(rpc_error(AlreadyExists("alpha/x exists", reason=ADAPTER_EXISTS)), "n")
    assert "alpha/x exists" in taken.message
    busy = classify(rpc_error(cases[0][0]), "ft-a")
    assert busy.retry_after_s == pytest.approx(0.3)


def test_a_heartbeat_while_the_node_prepares_names_the_node_only() -> None:
    """A progress without total_steps (the node still prepares) writes no step, loss or
    total over the job's: only its node."""
    assert progress_fields(jobs_pb2.TrainingProgress(node_id="ft-a"), "x") == {"train_node": "ft-a"}
    full = progress_fields(jobs_pb2.TrainingProgress(step=3, total_steps=6), "ft-a")
    assert full["train_step"] == 3 and full["train_total"] == 6 and full["train_node"] == "ft-a"


# -- the adapter is never lost -------------------------------------------------------------------


async def job_field(suite: Suite, job_id: str, name: str) -> bytes | None:
    client = redis.Redis.from_url(suite.redis_url)
    try:
        value: bytes | None = await client.hget(JobKeys(job_id).job, name)
        return value
    finally:
        await client.aclose()


@pytest.mark.parametrize("stop", ["cancel", "window"])
async def test_an_adapter_written_before_a_cancel_or_the_window_s_end_is_served(
    suite: Suite, stop: str
) -> None:
    """The node wrote the adapter, then (its call still open) the job is cancelled or its
    window closes: the adapter is registered in etcd and the job COMPLETED with it, not
    CANCELLED or EXPIRED with the adapter left unregistered and its name lost for good."""
    fleet = Fleet()
    async with training_node(suite.etcd, TrainingNode("ft-a", fleet, hold_s=10.0)):
        scheduler = await suite.start_scheduler(redis_url=suite.redis_url, **FAST)
        await finetune_nodes(scheduler, 1)
        job = await submit(suite, spec("kept"), window_s=3 if stop == "window" else 0)

        async def trained() -> bool:
            return bool(await job_field(suite, job.job_id, TRAINED_FIELD))

        for _ in range(600):
            if await trained():
                break
            await asyncio.sleep(0.02)
        assert await trained()
        if stop == "cancel":
            request = jobs_pb2.CancelJobRequest(job_id=job.job_id)
            await suite.jobs().CancelJob(request, metadata=auth())
        done = await wait_final(suite, job.job_id)
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
    assert done.adapter == f"{MODEL}:kept"
    registered = await adapter_in_etcd(suite.etcd, "alpha", "kept")
    assert registered is not None and registered.job_id == job.job_id


async def test_a_node_that_cannot_train_is_left_uncounted_and_a_taken_name_fails_at_once(
    suite: Suite,
) -> None:
    """With one attempt allowed: a node refusing NOT_FINETUNE_NODE is left for the other,
    which trains the job to COMPLETED (not counted, or the job would have FAILED); a node
    answering ALREADY_EXISTS ADAPTER_EXISTS fails the next job at once, with its message,
    after that one call."""
    fleet = Fleet()
    refusing = TrainingNode(
        "ft-a", fleet, refusals=[FailedPrecondition("not here", reason=NOT_FINETUNE_NODE)]
    )
    scheduler = await suite.start_scheduler(
        redis_url=suite.redis_url, finetune_max_deliveries=1, **FAST
    )
    async with (
        training_node(suite.etcd, refusing),
        training_node(suite.etcd, TrainingNode("ft-b", fleet)),
    ):
        await finetune_nodes(scheduler, 2)
        moved = await submit(suite, spec("moved"))
        done = await wait_final(suite, moved.job_id)
        assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
        assert [c[0] for c in fleet.calls] == ["ft-a", "ft-b"]
        assert scheduler.finetune is not None
        moves = scheduler.finetune.ctx.metrics.moves
        assert moves.labels("node_unsuitable")._value.get() == 1

        refusing.refusals = [
            AlreadyExists("alpha/taken holds other weights", reason=ADAPTER_EXISTS)
        ]
        taken = await submit(suite, spec("taken"))
        failed = await wait_final(suite, taken.job_id)
    assert failed.state == jobs_pb2.JOB_STATE_FAILED
    assert "ALREADY_EXISTS" in failed.error and "holds other weights" in failed.error
    assert [c for c in fleet.calls if c[1] == taken.job_id] == [("ft-a", taken.job_id, 1)]


# -- one open call per job, read by its driver ---------------------------------------------------


async def test_a_call_whose_job_went_final_under_it_is_cancelled(suite: Suite) -> None:
    """The job goes final while its node streams (finalized behind the driver's back, a
    fault injected): the reader stops at the next event and the driver cancels the call, so
    the node stops training for nobody."""
    fleet = Fleet()
    async with training_node(suite.etcd, TrainingNode("ft-a", fleet, step_s=0.02)):
        scheduler = await suite.start_scheduler(redis_url=suite.redis_url, **FAST)
        await finetune_nodes(scheduler, 1)
        job = await submit(suite, spec(max_steps=100_000))
        await wait_for(suite, job.job_id, lambda j: j.training.step >= 2)
        client = redis.Redis.from_url(suite.redis_url)
        await client.hset(JobKeys(job.job_id).job, "state", jobs_pb2.JOB_STATE_FAILED)
        await client.aclose()
        await eventually(lambda: fleet.cancelled == [job.job_id], timeout=10)
        assert scheduler.finetune is not None
        await eventually(lambda: scheduler.finetune is not None and not scheduler.finetune.driving)
    assert len(fleet.calls) == 1


async def test_only_the_replica_holding_a_driver_entry_keeps_or_counts_it(suite: Suite) -> None:
    """Two consumers of one driver entry: after B took it over from A, A's heartbeat, attempt
    count and reset all leave it B's, with B's count (a stale A never takes it back); B's
    count and reset apply; once the job is final, every one says so (-1)."""
    await suite.start_scheduler(redis_url=suite.redis_url, job_reclaim_idle_seconds=60.0)
    job = await submit(suite, spec("contended"))
    client = redis.Redis.from_url(suite.redis_url)
    try:
        store, ft = JobStore(client), FinetuneStore(client)
        (delivery,) = await store.read(job.job_id, "replica-a", 1)
        entry, lines = delivery.entry_id, JobKeys(job.job_id).lines
        await client.xclaim(lines, "workers", "replica-b", 0, [entry])  # B took it over
        assert await ft.keep(job.job_id, "replica-a", entry) == 0
        assert await ft.redeliver(job.job_id, "replica-a", entry) == 0
        await ft.reset_attempts(job.job_id, "replica-a", entry)
        assert await ft.owner(job.job_id, entry) == "replica-b"
        (pending,) = await client.xpending_range(lines, "workers", entry, entry, 1)
        assert pending["times_delivered"] == 2
        assert await ft.redeliver(job.job_id, "replica-b", entry) == 3
        assert await ft.keep(job.job_id, "replica-b", entry) == 3
        await ft.reset_attempts(job.job_id, "replica-b", entry)
        assert await ft.keep(job.job_id, "replica-b", entry) == 1
        assert await ft.fail(job.job_id, "done with")
        assert await ft.keep(job.job_id, "replica-b", entry) == -1
        assert await ft.redeliver(job.job_id, "replica-b", entry) == 0
    finally:
        await client.aclose()


class RedisLink:
    """A TCP relay between one scheduler and Redis that can be cut: a network partition,
    injected on purpose. While cut, every connection is closed at once."""

    def __init__(self, target: str) -> None:
        self.host, _, port = target.partition(":")
        self.port = int(port)
        self.cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        """Listen; the URL to give the scheduler."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    def sever(self) -> None:
        self.cut = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def heal(self) -> None:
        self.cut = False

    async def stop(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(65536):
                if self.cut:
                    break
                sink.write(data)
                await sink.drain()
        sink.close()


@contextlib.asynccontextmanager
async def redis_link(suite: Suite) -> AsyncIterator[tuple[RedisLink, str]]:
    link = RedisLink(suite.redis_url.removeprefix("redis://").partition("/")[0])
    url = await link.start()
    try:
        yield link, url
    finally:
        await link.stop()


async def test_a_replica_cut_off_from_redis_stops_training_before_another_takes_over(
    suite: Suite,
) -> None:
    """Replica A drives a fine-tune and loses Redis (its link cut): it cannot tell whether it
    still holds the driver entry, so once the reclaim bound less a heartbeat has passed since
    Redis last confirmed it, A cancels its Train call; replica B takes the entry over after
    the bound and the node resumes from the checkpoint. Never two calls of the job open at
    once; COMPLETED, every step once (those A's node trained while A could not record them
    sent again from the checkpoint B's node resumed from)."""
    fleet = Fleet()
    timing = {"job_reclaim_idle_seconds": 3.0, "job_heartbeat_seconds": 1.0}
    async with (
        training_node(suite.etcd, TrainingNode("ft-a", fleet, step_s=0.1)),
        redis_link(suite) as (link, url),
    ):
        a = await suite.start_scheduler(redis_url=url, scheduler_id="replica-a", **timing)
        await finetune_nodes(a, 1)
        job = await submit(suite, spec(max_steps=40))
        await wait_for(suite, job.job_id, lambda j: j.training.checkpoint_step >= 2)
        b = await suite.start_scheduler(
            redis_url=suite.redis_url, scheduler_id="replica-b", **timing
        )
        link.sever()
        try:
            await eventually(lambda: fleet.cancelled == [job.job_id], timeout=10)
            assert a.finetune is not None
            await eventually(lambda: a.finetune is not None and not a.finetune.driving)
            done = await wait_final(suite, job.job_id, timeout=60)
        finally:
            link.heal()
            await a.stop(0.5)
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
    assert fleet.most_open[job.job_id] == 1
    assert len(fleet.calls) == 2 and fleet.calls[1][2] >= 3
    assert [r.step.step for r in await steps(suite, job.job_id)] == list(range(1, 41))
    assert b.finetune is not None
    assert b.finetune.ctx.metrics.moves.labels("taken_over")._value.get() == 1


def test_an_open_call_s_asks_to_redis_end_half_the_lease_s_margin_past_its_end() -> None:
    """With a reclaim bound of 3 s and heartbeats of 1 s, the lease ends 1 s before another
    replica may take the entry: while the call is open, a request to Redis waits at most its
    own bound before the lease ends, only what is left of the next 0.5 s after it, then not
    at all (the call is cancelled before the takeover, not a timeout later)."""
    settings = SchedulerSettings(job_reclaim_idle_seconds=3.0, job_heartbeat_seconds=1.0)
    ctx = cast(DriverContext, SimpleNamespace(settings=settings))
    delivery = cast(Delivery, SimpleNamespace(job_id="j", deliveries=1))
    driver = FinetuneDriver(ctx, delivery, cast(JobRecord, SimpleNamespace(tenant="alpha")))
    now = time.monotonic()
    assert 1.9 < driver._lease_end - now <= 2.0  # just confirmed: 3 s less the 1-s margin
    assert driver._within_lease(0.5) == 0.5
    driver._lease_end = now - 0.2  # the lease ended 0.2 s ago: 0.3 s of the half margin left
    assert 0.25 < driver._within_lease(1.0) <= 0.3
    driver._lease_end = now - 0.6
    assert driver._within_lease(1.0) == 0.0


# -- the runner's small rules --------------------------------------------------------------------


async def test_a_job_refused_as_busy_stays_queued_until_a_node_trains_it(suite: Suite) -> None:
    """Opening a Train call the node then refuses (busy) leaves the job QUEUED; the first
    event from a node makes it RUNNING."""
    fleet = Fleet()
    busy = [ResourceExhausted("busy", retry_after_s=0.2, reason=TRAINING_BUSY)] * 4
    async with training_node(suite.etcd, TrainingNode("ft-a", fleet, refusals=busy)):
        scheduler = await suite.start_scheduler(redis_url=suite.redis_url, **FAST)
        await finetune_nodes(scheduler, 1)
        job = await submit(suite, spec("patient"))
        refused: set[int] = set()
        while len(fleet.calls) < 5:
            state = (await get(suite, job.job_id)).state
            if 1 <= len(fleet.calls) <= 4:  # only refusals so far, even before the read
                refused.add(state)
            await asyncio.sleep(0.02)
        done = await wait_final(suite, job.job_id)
    assert refused == {jobs_pb2.JOB_STATE_QUEUED}
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done


async def test_a_replica_takes_over_no_more_jobs_than_it_may_drive(suite: Suite) -> None:
    """Two jobs whose replica died (their entries held by a consumer gone for good): a
    replica allowed one job at a time takes one over, and the other only once the first is
    done; both complete."""
    fleet = Fleet()
    scheduler = await suite.start_scheduler(
        redis_url=suite.redis_url, finetune_max_jobs_per_replica=1, **FAST
    )
    jobs = [await submit(suite, spec(f"orphan-{i}")) for i in range(2)]
    client = redis.Redis.from_url(suite.redis_url)
    for job in jobs:  # a replica read them, then died
        assert await JobStore(client).read(job.job_id, "ghost", 1)
    await client.aclose()
    assert scheduler.finetune is not None
    runner = scheduler.finetune
    most = 0
    async with training_node(suite.etcd, TrainingNode("ft-a", fleet, step_s=0.05)):
        for _ in range(1500):
            most = max(most, len(runner.driving))
            states = [(await get(suite, j.job_id)).state for j in jobs]
            if all(s == jobs_pb2.JOB_STATE_COMPLETED for s in states):
                break
            await asyncio.sleep(0.02)
    assert states == [jobs_pb2.JOB_STATE_COMPLETED] * 2
    assert most == 1
    assert runner.ctx.metrics.moves.labels("taken_over")._value.get() == 2
