"""The jobs store against a real Redis: commit, delivery, results written once, reclaim,
cancel and expiry, each state change atomic."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from scheduler.jobs.model import ACTIVE_KEY, JobKeys, JobRecord, idempotency_key, new_job_id
from scheduler.jobs.store import JobStore, now_ms
from sluice.v1 import jobs_pb2


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[JobStore]:
    client = redis.Redis.from_url(redis_url)
    yield JobStore(client)
    await client.aclose()


async def _job(store: JobStore, lines: int, *, key: str = "", tenant: str = "alpha") -> str:
    record = JobRecord(
        job_id=new_job_id(),
        tenant=tenant,
        idempotency_key=key,
        created_ms=now_ms(),
        deadline_ms=now_ms() + 60_000,
        retention_ms=60_000,
        total=lines,
        work_tokens=10.0 * lines,
    )
    await store.begin(record)
    await store.add_lines(
        record.job_id, [(n, f"line {n}".encode(), 10.0) for n in range(1, lines + 1)], []
    )
    return await store.commit(record, idem_ttl_ms=60_000)


async def test_lines_are_delivered_once_and_results_written_once(store: JobStore) -> None:
    """Each line goes to one consumer; a result written twice (a line computed twice) keeps
    the first and reports a duplicate; the last line's result completes the job, which leaves
    the active set with its retention as TTL."""
    job_id = await _job(store, 3)
    first = await store.read(job_id, "a", 2)
    second = await store.read(job_id, "b", 5)
    assert [d.line_number for d in first] == [1, 2]
    assert [d.line_number for d in second] == [3]
    assert await store.finish(first[0], "c1", b"r1", ok=True) == 1
    assert await store.finish(first[0], "c1", b"again", ok=True) in (0, 2)
    assert await store.finish(first[1], "c2", b"r2", ok=False) == 1
    assert await store.finish(second[0], "c3", b"r3", ok=True) == 3
    record = await store.get(job_id)
    assert record is not None
    assert record.state == jobs_pb2.JOB_STATE_COMPLETED
    assert (record.completed, record.failed, record.total) == (2, 1, 3)
    assert await store.results_of(job_id, ["c1", "c2", "c3"]) == [b"r1", b"r2", b"r3"]
    assert job_id not in dict(await store.active())
    assert 0 < await store._redis.pttl(JobKeys(job_id).job) <= 60_000


async def test_a_recomputed_line_is_counted_once(store: JobStore) -> None:
    """A line reclaimed from a consumer that computed it but died before acknowledging:
    the second result finds the first and is reported as a duplicate, counts unchanged."""
    job_id = await _job(store, 2)
    (line, _) = await store.read(job_id, "dead", 2)
    await store._redis.hsetnx(JobKeys(job_id).results, "c1", b"first")  # written, never acked
    await store._redis.hincrby(JobKeys(job_id).job, "completed", 1)
    _, reclaimed = await store.reclaim(job_id, "alive", 0, 10)
    (again,) = [d for d in reclaimed if d.line_number == 1]
    assert again.deliveries == 2
    assert await store.finish(again, "c1", b"second", ok=True) == 2
    record = await store.get(job_id)
    assert record is not None and record.completed == 1
    assert await store.results_of(job_id, ["c1"]) == [b"first"]
    assert line.line_number == 1


async def test_idempotent_commit_returns_the_first_job(store: JobStore) -> None:
    """A second upload with the same tenant and key commits as the first job; its own keys
    are deleted. Another tenant's same key is a different job."""
    first = await _job(store, 1, key="k")
    second = await _job(store, 1, key="k")
    other = await _job(store, 1, key="k", tenant="beta")
    assert second == first
    assert other != first
    assert [j for j, _ in await store.list_ids("alpha", (now_ms() + 1, ""), 10)].count(first) == 1


async def test_cancel_waits_for_lines_in_flight(store: JobStore) -> None:
    """Cancel with a line in flight: CANCELLING, no more lines to read for the worker that
    checks, the in-flight line's result is kept, then CANCELLED with the rest counted."""
    job_id = await _job(store, 4)
    (line,) = await store.read(job_id, "a", 1)
    assert await store.cancel(job_id) == jobs_pb2.JOB_STATE_CANCELLING
    assert job_id in dict(await store.active())  # kept until final: its lines are reclaimable
    assert await store.finish(line, "c1", b"r1", ok=True) == 4
    record = await store.get(job_id)
    assert record is not None
    assert record.state == jobs_pb2.JOB_STATE_CANCELLED
    assert (record.completed, record.cancelled) == (1, 3)
    assert await store.cancel(job_id) == jobs_pb2.JOB_STATE_CANCELLED


async def test_expiry_counts_what_is_left_and_drops_late_results(store: JobStore) -> None:
    """Finalizing EXPIRED counts unfinished lines expired; a result arriving after is
    dropped (the job is final)."""
    job_id = await _job(store, 3)
    lines = await store.read(job_id, "a", 3)
    await store.finish(lines[0], "c1", b"r1", ok=True)
    expired = (True, jobs_pb2.JOB_STATE_EXPIRED)
    assert await store.finalize(job_id, jobs_pb2.JOB_STATE_EXPIRED) == expired
    assert await store.finalize(job_id, jobs_pb2.JOB_STATE_EXPIRED) == (False, expired[1])
    assert await store.finish(lines[1], "c2", b"late", ok=True) == 0
    record = await store.get(job_id)
    assert record is not None
    assert (record.completed, record.expired, record.state) == (1, 2, jobs_pb2.JOB_STATE_EXPIRED)
    assert not await store._redis.exists(JobKeys(job_id).lines)
    assert not await store._redis.zscore(ACTIVE_KEY, job_id)


async def test_a_cancelled_job_with_a_dead_workers_line_ends_cancelled(store: JobStore) -> None:
    """Cancel while a dead consumer holds a line: the job stays in the active set, the line is
    reclaimed and settled, and the job becomes CANCELLED with every line counted."""
    job_id = await _job(store, 3)
    (held,) = await store.read(job_id, "dead", 1)
    assert await store.cancel(job_id) == jobs_pb2.JOB_STATE_CANCELLING
    _, (again,) = await store.reclaim(job_id, "alive", 0, 10)
    assert again.entry_id == held.entry_id
    await store.settle(again)
    record = await store.get(job_id)
    assert record is not None
    assert (record.state, record.cancelled) == (jobs_pb2.JOB_STATE_CANCELLED, 3)
    assert job_id not in dict(await store.active())


async def test_an_idempotency_key_ends_with_its_job(store: JobStore) -> None:
    """Once a job is final its idempotency key expires with it; a key naming a job that no
    longer exists does not block a new submission."""
    first = await _job(store, 1, key="k2")
    (line,) = await store.read(first, "a", 1)
    await store.finish(line, "c", b"r", ok=True)
    key = idempotency_key("alpha", "k2")
    assert 0 < await store._redis.pttl(key) <= 60_000
    await store._redis.delete(*JobKeys(first).all())  # the job's retention ran out
    second = await _job(store, 1, key="k2")
    assert second != first


async def test_jobs_listed_in_the_same_millisecond_are_all_listed(store: JobStore) -> None:
    """Paging by (created, id): three jobs created in one millisecond, two per page, all
    listed once."""
    ids = []
    for n in range(3):
        record = JobRecord(
            job_id=f"job-same-{n}", tenant="gamma", created_ms=1000, deadline_ms=10**13, total=1
        )
        await store.begin(record)
        await store.add_lines(record.job_id, [(1, b"x", 1.0)], [])
        ids.append(await store.commit(record, idem_ttl_ms=60_000))
    page = await store.list_ids("gamma", (now_ms(), ""), 2)
    rest = await store.list_ids("gamma", (page[-1][1], page[-1][0]), 2)
    assert sorted(j for j, _ in page + rest) == sorted(ids)
