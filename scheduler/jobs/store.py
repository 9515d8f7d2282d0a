"""Jobs in Redis: the record, the lines as a stream with one consumer group, the results.

What must never be lost or counted twice goes through one Lua script each, atomic in Redis:

- ``commit``: an uploaded job becomes visible (QUEUED, in the active set, in its tenant's list)
  unless its idempotency key already names another job, which is returned instead;
- ``finish``: a line's result is written only if none is there yet (``HSETNX`` on its
  custom_id), counted, and the line acknowledged and deleted from the stream, in one step: a
  line computed twice (its worker died after computing, before acknowledging) keeps one result
  and is counted as a duplicate;
- ``settle``: a line skipped because its job was cancelled or expired is acknowledged;
- ``cancel`` / ``finalize``: the state changes once; the lines left over are counted cancelled
  or expired; the job's keys get its retention as TTL.

A job that reached a final state is removed from the active set and keeps its record and
results for its retention period. An upload that never commits expires after an hour.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from scheduler.jobs.model import (
    ACTIVE_KEY,
    GROUP,
    PREFIX,
    THROUGHPUT_KEY,
    JobKeys,
    JobRecord,
    idempotency_key,
    tenant_jobs_key,
)
from scheduler.jobs.scripts import CANCEL, COMMIT, FINALIZE_NOW, FINISH, SETTLE, STARTED
from sluice.v1 import jobs_pb2

LINE_NODES_TTL_MS = 3_600_000
"""How long a job's line → node map outlives its last write."""

UPLOAD_TTL_MS = 3_600_000


def jobs_redis(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """The jobs' Redis client: bounded waits, a few retries on connection errors (a restarted
    Redis is found again), periodic health checks of idle connections."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), 3),
        health_check_interval=10,
    )


def now_ms() -> int:
    """Wall-clock milliseconds (every replica's clocks are assumed NTP-synchronised)."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Delivery:
    """One line handed to this consumer."""

    job_id: str
    entry_id: str
    line_number: int
    body: bytes
    """A serialized ``JobLine``."""
    tokens: float
    """Its estimated work."""
    deliveries: int = 1
    """How many times Redis has handed it out (this time included)."""


class UploadExpired(Exception):
    """An upload took longer than ``UPLOAD_TTL_MS``: its record expired before the commit."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parsed(raw: dict[bytes, bytes]) -> JobRecord | None:
    if not raw or raw.get(b"state", b"0") == b"0":
        return None
    try:
        return JobRecord.from_hash(raw)
    except (KeyError, ValueError):  # a hash without its identity: never a committed job
        return None


def _delivery(job_id: str, entry_id: bytes, fields: dict[bytes, bytes], count: int) -> Delivery:
    return Delivery(
        job_id=job_id,
        entry_id=entry_id.decode(),
        line_number=int(fields.get(b"n", b"0")),
        body=fields.get(b"b", b""),
        tokens=float(fields.get(b"t", b"0")),
        deliveries=count,
    )


class JobStore:
    """Every Redis operation of the jobs subsystem (one client, shared by the replica)."""

    def __init__(self, client: redis.Redis) -> None:
        # redis-py types every reply as a union of what any decoding could return: read as Any.
        self._redis: Any = client
        self._commit = client.register_script(COMMIT)
        self._finish = client.register_script(FINISH)
        self._settle = client.register_script(SETTLE)
        self._cancel = client.register_script(CANCEL)
        self._finalize = client.register_script(FINALIZE_NOW)
        self._started = client.register_script(STARTED)

    # -- submission ------------------------------------------------------------------------

    async def existing(self, tenant: str, key: str) -> str | None:
        """The job id an idempotency key already names, if any."""
        found = await self._redis.get(idempotency_key(tenant, key))
        return found.decode() if found else None

    async def begin(self, record: JobRecord) -> None:
        """Write a job's record before its lines (invisible until ``commit``)."""
        keys = JobKeys(record.job_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.job, mapping={**record.to_hash(), "state": "0"})
            pipe.pexpire(keys.job, UPLOAD_TTL_MS)
            await pipe.execute()

    async def add_lines(
        self,
        job_id: str,
        lines: Sequence[tuple[int, bytes, float]],
        failed: Sequence[tuple[str, bytes]],
    ) -> None:
        """Append ``(line_number, JobLine bytes, tokens)`` to the stream and store the results
        of lines refused at submission (``(custom_id, JobResult bytes)``)."""
        keys = JobKeys(job_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for number, body, tokens in lines:
                pipe.xadd(keys.lines, {"n": number, "b": body, "t": round(tokens, 1)})
            pipe.pexpire(keys.job, UPLOAD_TTL_MS)
            if lines:
                pipe.pexpire(keys.lines, UPLOAD_TTL_MS)
            if failed:
                pipe.hset(keys.results, mapping=dict(failed))
                pipe.hincrby(keys.job, "failed", len(failed))
                pipe.pexpire(keys.results, UPLOAD_TTL_MS)
            await pipe.execute()

    async def commit(self, record: JobRecord, idem_ttl_ms: int) -> str:
        """Make the uploaded job visible; returns its id, or the id of the job its idempotency
        key already names (this upload is then deleted)."""
        keys = JobKeys(record.job_id)
        has_idem = bool(record.idempotency_key)
        winner = await self._commit(
            keys=[
                keys.job,
                keys.lines,
                keys.results,
                ACTIVE_KEY,
                tenant_jobs_key(record.tenant),
                idempotency_key(record.tenant, record.idempotency_key),
            ],
            args=[
                record.job_id,
                record.created_ms,
                record.deadline_ms,
                idem_ttl_ms,
                "1" if has_idem else "0",
                now_ms(),
                f"{PREFIX}:job:{{",
            ],
        )
        job_id = winner.decode() if isinstance(winner, bytes) else str(winner)
        if not job_id:
            raise UploadExpired(record.job_id)
        if job_id != record.job_id:
            await self.discard(record.job_id)
        return job_id

    async def discard(self, job_id: str) -> None:
        """Delete an upload that will not be committed."""
        await self._redis.delete(*JobKeys(job_id).all())

    # -- reading jobs ----------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord | None:
        """A committed job's record, or None."""
        return _parsed(await self._redis.hgetall(JobKeys(job_id).job))

    async def list_ids(
        self, tenant: str, before: tuple[int, str], count: int
    ) -> list[tuple[str, int]]:
        """A tenant's job ids after the position ``(created_ms, job_id)`` in newest-first
        order (equal times in descending id order, as Redis keeps them), at most ``count``."""
        before_ms, before_id = before
        found = await self._redis.zrevrangebyscore(
            tenant_jobs_key(tenant), before_ms, "-inf", start=0, num=count + 64, withscores=True
        )
        out = [
            (_text(job_id), int(score))
            for job_id, score in found
            if not (int(score) == before_ms and before_id and _text(job_id) >= before_id)
        ]
        return out[:count]

    async def forget(self, tenant: str, job_ids: Sequence[str]) -> None:
        """Remove expired jobs from a tenant's list."""
        if job_ids:
            await self._redis.zrem(tenant_jobs_key(tenant), *job_ids)

    async def active(self) -> list[tuple[str, int]]:
        """Jobs with lines to run, earliest deadline first: ``(job_id, deadline_ms)``."""
        found = await self._redis.zrange(ACTIVE_KEY, 0, -1, withscores=True)
        return [(job_id.decode(), int(score)) for job_id, score in found]

    async def records(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """Records of many jobs in one round trip (None: gone, uploading or unreadable)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(JobKeys(job_id).job)
            raws = await pipe.execute()
        return [_parsed(raw) for raw in raws]

    async def settled_tokens(self) -> float:
        """Estimated work of every line settled so far, all jobs, all replicas."""
        value = await self._redis.hget(THROUGHPUT_KEY, "tokens")
        return float(value or 0.0)

    # -- lines -----------------------------------------------------------------------------

    async def read(self, job_id: str, consumer: str, count: int) -> list[Delivery]:
        """Up to ``count`` lines of a job never delivered before, now this consumer's."""
        lines = JobKeys(job_id).lines
        try:
            reply = await self._redis.xreadgroup(GROUP, consumer, {lines: ">"}, count=count)
        except redis.ResponseError:  # NOGROUP: the job went final meanwhile
            return []
        out: list[Delivery] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                if fields:  # deleted meanwhile
                    out.append(_delivery(job_id, entry_id, fields, 1))
        return out

    async def reclaim(
        self, job_id: str, consumer: str, min_idle_ms: int, count: int, start: str = "0-0"
    ) -> tuple[str, list[Delivery]]:
        """Lines another consumer holds without a heartbeat for ``min_idle_ms``, now this
        consumer's (``XAUTOCLAIM`` from ``start``), with their delivery counts; and the cursor
        to go on from ("0-0" once the whole pending list was scanned)."""
        lines = JobKeys(job_id).lines
        try:
            reply = await self._redis.xautoclaim(
                lines, GROUP, consumer, min_idle_ms, start_id=start, count=count
            )
        except redis.ResponseError:  # NOGROUP: the job went final meanwhile
            return "0-0", []
        cursor = _text(reply[0])
        entries = [(eid, fields) for eid, fields in reply[1] if fields]
        if not entries:
            return cursor, []
        counts = await self._delivery_counts(lines, [eid for eid, _ in entries])
        found = [_delivery(job_id, eid, fields, counts.get(eid, 1)) for eid, fields in entries]
        return cursor, found

    async def _delivery_counts(self, lines: str, ids: Sequence[bytes]) -> dict[bytes, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for eid in ids:
                pipe.xpending_range(lines, GROUP, min=eid, max=eid, count=1)
            replies = await pipe.execute()
        out: dict[bytes, int] = {}
        for eid, reply in zip(ids, replies, strict=True):
            if reply:
                out[eid] = int(reply[0]["times_delivered"])
        return out

    async def touch(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """Heartbeat: reset the idle time of the lines this consumer still owns and works on
        (a live worker's lines are never reclaimed, however long they run or wait). A line
        another replica took over meanwhile is left to it; a job gone final is skipped."""
        by_job: dict[str, set[str]] = {}
        for d in deliveries:
            by_job.setdefault(d.job_id, set()).add(d.entry_id)
        jobs = list(by_job)
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in jobs:
                pipe.xpending_range(
                    JobKeys(job_id).lines, GROUP, "-", "+", len(by_job[job_id]) + 64, consumer
                )
            owned = await pipe.execute(raise_on_error=False)
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id, mine in zip(jobs, owned, strict=True):
                if isinstance(mine, Exception):
                    continue
                ids = [e["message_id"] for e in mine if _text(e["message_id"]) in by_job[job_id]]
                if ids:
                    pipe.xclaim(JobKeys(job_id).lines, GROUP, consumer, 0, ids, justid=True)
            await pipe.execute(raise_on_error=False)

    async def redeliver(self, consumer: str, delivery: Delivery, error: jobs_pb2.LineError) -> int:
        """Count one more delivery of a line this consumer retries, and keep its last error
        (for a dead letter after its worker dies); returns the count, 0 when the job is gone."""
        keys = JobKeys(delivery.job_id)
        try:
            await self._redis.xclaim(keys.lines, GROUP, consumer, 0, [delivery.entry_id])
        except redis.ResponseError:
            return 0
        await self._redis.hset(keys.job, f"err:{delivery.entry_id}", error.SerializeToString())
        counts = await self._delivery_counts(keys.lines, [delivery.entry_id.encode()])
        return counts.get(delivery.entry_id.encode(), 0)

    async def record_node(self, delivery: Delivery, node_id: str) -> None:
        """``node_id`` is generating the line (detached: it finishes without this replica)."""
        key = JobKeys(delivery.job_id).nodes
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, delivery.entry_id, node_id)
            pipe.pexpire(key, LINE_NODES_TTL_MS)
            await pipe.execute()

    async def line_node(self, delivery: Delivery) -> str:
        """The node a previous delivery of the line was generating on ("" when none)."""
        raw = await self._redis.hget(JobKeys(delivery.job_id).nodes, delivery.entry_id)
        return raw.decode() if isinstance(raw, bytes) else (raw or "")

    async def last_error(self, delivery: Delivery) -> jobs_pb2.LineError | None:
        """The error a line's last failed attempt recorded, if any."""
        raw = await self._redis.hget(JobKeys(delivery.job_id).job, f"err:{delivery.entry_id}")
        return jobs_pb2.LineError.FromString(raw) if raw else None

    async def finish(
        self, delivery: Delivery, custom_id: str, result: bytes, *, ok: bool, dead: bool = False
    ) -> int:
        """Store a line's result (unless one is there), count it, acknowledge the line; see
        ``scripts.FINISH`` for the return codes."""
        keys = JobKeys(delivery.job_id)
        code = await self._finish(
            keys=[keys.job, keys.lines, keys.results, ACTIVE_KEY, THROUGHPUT_KEY],
            args=[
                delivery.entry_id,
                custom_id,
                result,
                "completed" if ok else "failed",
                "1" if dead else "0",
                round(delivery.tokens, 1),
                now_ms(),
            ],
        )
        return int(code)

    async def settle(self, delivery: Delivery) -> None:
        """Acknowledge a line skipped because its job was cancelled or expired."""
        keys = JobKeys(delivery.job_id)
        await self._settle(
            keys=[keys.job, keys.lines, keys.results, ACTIVE_KEY],
            args=[delivery.entry_id, now_ms()],
        )

    async def started(self, job_id: str) -> None:
        """Record when the job's first line started (once)."""
        await self._started(keys=[JobKeys(job_id).job], args=[now_ms()])

    async def set_fields(self, job_id: str, fields: dict[str, float | int | str]) -> None:
        """Set fields of a job's record."""
        await self._redis.hset(JobKeys(job_id).job, mapping=fields)

    async def predict(self, job_id: str, predicted_ms: int) -> None:
        """Update a job's predicted completion."""
        await self._redis.hset(JobKeys(job_id).job, "predicted_ms", predicted_ms)

    # -- state changes ---------------------------------------------------------------------

    async def cancel(self, job_id: str) -> int:
        """Cancel: CANCELLING while lines are in flight, else CANCELLED; returns the state."""
        keys = JobKeys(job_id)
        state = await self._cancel(
            keys=[keys.job, keys.lines, keys.results, ACTIVE_KEY], args=[now_ms()]
        )
        return int(state)

    async def finalize(self, job_id: str, state: int) -> tuple[bool, int]:
        """Move a job to final ``state`` now (expiry; a CANCELLING job becomes CANCELLED);
        returns whether this call changed it, and the state after."""
        keys = JobKeys(job_id)
        changed, after = await self._finalize(
            keys=[keys.job, keys.lines, keys.results, ACTIVE_KEY], args=[state, now_ms()]
        )
        return bool(changed), int(after)

    # -- results ---------------------------------------------------------------------------

    async def results_page(self, job_id: str, cursor: int, count: int) -> tuple[int, list[bytes]]:
        """One page of serialized results from ``cursor`` (``HSCAN``); cursor 0 after the last."""
        nxt, found = await self._redis.hscan(JobKeys(job_id).results, cursor, count=count)
        return int(nxt), list(found.values())

    async def results_of(self, job_id: str, custom_ids: Sequence[str]) -> list[bytes]:
        """The serialized results of these lines (those that have one)."""
        found = await self._redis.hmget(JobKeys(job_id).results, list(custom_ids))
        return [value for value in found if value is not None]
