"""A fine-tune job in Redis: what it adds to a batch job's keys, and its atomic scripts.

A fine-tune job uses the keys of every job (:mod:`scheduler.jobs.model`) this way:

- its **stream** holds its examples (entries ``n``/``b``/``t`` as a batch job's lines, read
  with ``XRANGE``, never through the group) followed by one **driver entry**
  ``{"driver": <job id>}``. The consumer group is created at the last example, so the driver
  entry is the only one ever delivered: the replica that holds it (``XREADGROUP``, kept alive
  by the heartbeat ``XCLAIM JUSTID``, taken over with ``XAUTOCLAIM`` when its replica dies)
  drives the job. Its delivery count is the job's attempts since its last new checkpoint;
- its **hash** gains ``ft_spec`` (the ``FinetuneSpec``, defaults filled, base64),
  ``ft_trained`` (the adapter's path once the node wrote it), ``ft_last_error`` and the
  ``train_*`` progress fields of :class:`~scheduler.jobs.model.JobRecord`;
- its **results** are its steps, ``step-<8 digits>`` → a ``JobResult`` whose ``step`` is the
  ``TrainingStep`` (written once per step: a step reported twice, after a resume, is kept
  once);
- ``sluice:jobs:v1:adapter:<hash>`` (:func:`~scheduler.jobs.model.adapter_claim_key`) holds
  the job that claimed the tenant's adapter name; a claim whose job is FAILED, CANCELLED,
  EXPIRED or gone no longer counts.

The scripts: ``FT_COMMIT`` (``COMMIT`` plus the adapter claim, the group after the examples
and the driver entry), ``FT_RECORD`` (a step and/or progress fields, only while the job is
not final), ``FT_COMPLETE`` and ``FT_FAIL`` (final states, counting every example once),
``FT_STOP`` (CANCELLED or EXPIRED, unless the adapter was written: that job is completed),
``FT_KEEP`` (the driver entry's heartbeat and attempt counting, only by the consumer that
holds it: checked and claimed in one step, so a replica never takes back an entry another
replica took over).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import redis.asyncio as redis

from scheduler.jobs.model import (
    ACTIVE_KEY,
    GROUP,
    PREFIX,
    JobKeys,
    JobRecord,
    adapter_claim_key,
    idempotency_key,
    tenant_jobs_key,
)
from scheduler.jobs.scripts import FINALIZE_HELPERS
from scheduler.jobs.store import UploadExpired, now_ms
from sluice.v1 import jobs_pb2

DRIVER_FIELD = "driver"
"""The one field of a fine-tune stream's driver entry (its value: the job id)."""
SPEC_FIELD = "ft_spec"
TRAINED_FIELD = "ft_trained"
LAST_ERROR_FIELD = "ft_last_error"
EXAMPLES_PAGE = 1000

_FAILED = jobs_pb2.JOB_STATE_FAILED
_CANCELLED = jobs_pb2.JOB_STATE_CANCELLED
_EXPIRED = jobs_pb2.JOB_STATE_EXPIRED

# KEYS: job, lines, results, active, tenant_jobs, idem, claim | ARGV: job_id, created_ms,
# deadline_ms, idem_ttl_ms, has_idem, now_ms, job key prefix, claim_ttl_ms. Returns the job
# id, the id its idempotency key names, "!<job id>" when the adapter name is claimed, or ""
# when the upload expired.
FT_COMMIT = (
    FINALIZE_HELPERS
    + f"""
if redis.call('HEXISTS', KEYS[1], 'job_id') == 0 then return '' end
if ARGV[5] == '1' then
  local other = redis.call('GET', KEYS[6])
  if other and other ~= ARGV[1]
     and redis.call('EXISTS', ARGV[7] .. other .. '}}') == 1 then
    return other
  end
end
local holder = redis.call('GET', KEYS[7])
if holder and holder ~= ARGV[1] then
  local st = tonumber(redis.call('HGET', ARGV[7] .. holder .. '}}', 'state') or '0')
  if st ~= 0 and st ~= {_FAILED} and st ~= {_CANCELLED} and st ~= {_EXPIRED} then
    return '!' .. holder
  end
end
if redis.call('EXISTS', KEYS[2]) == 0 then return '' end
redis.call('SET', KEYS[7], ARGV[1], 'PX', ARGV[8])
if ARGV[5] == '1' then
  redis.call('SET', KEYS[6], ARGV[1], 'PX', ARGV[4])
  redis.call('HSET', KEYS[1], 'idem_redis_key', KEYS[6])
end
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[3])
redis.call('PERSIST', KEYS[2])
redis.call('HSET', KEYS[1], 'state', {jobs_pb2.JOB_STATE_QUEUED})
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1][1]
redis.call('XGROUP', 'CREATE', KEYS[2], '{GROUP}', last)
redis.call('XADD', KEYS[2], '*', '{DRIVER_FIELD}', ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
return ARGV[1]
"""
)

# KEYS: job, results | ARGV: step key ("" for none), result, now_ms, started ("1": a node
# trains it: QUEUED becomes RUNNING), field, value, ... Returns 0 when the job is gone or final
# (nothing written), 1 written, 2 step already there.
FT_RECORD = (
    FINALIZE_HELPERS
    + f"""
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if state == 0 or is_final(state) then return 0 end
local out = 1
if ARGV[1] ~= '' and redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then out = 2 end
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
if ARGV[4] == '1' then
  if state == {jobs_pb2.JOB_STATE_QUEUED} then
    redis.call('HSET', KEYS[1], 'state', {jobs_pb2.JOB_STATE_RUNNING})
  end
  if redis.call('HGET', KEYS[1], 'started_ms') == '0' then
    redis.call('HSET', KEYS[1], 'started_ms', ARGV[3])
  end
end
return out
"""
)

# KEYS: job, lines, results, active | ARGV: state (CANCELLED or EXPIRED), now_ms. Returns
# {0, state} when the job is gone or already final, {2, state} when its adapter was written
# (left alone: its driver registers it and completes the job), else {1, the final state}
# (a CANCELLING job becomes CANCELLED).
FT_STOP = (
    FINALIZE_HELPERS
    + f"""
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if state == 0 or is_final(state) then return {{0, state}} end
local trained = redis.call('HGET', KEYS[1], '{TRAINED_FIELD}')
if trained and trained ~= '' then return {{2, state}} end
local target = tonumber(ARGV[1])
if state == {jobs_pb2.JOB_STATE_CANCELLING} then target = {_CANCELLED} end
return {{1, finalize(KEYS[1], KEYS[2], KEYS[4], target, tonumber(ARGV[2]))}}
"""
)

# KEYS: lines | ARGV: consumer, entry_id, mode: "touch" (reset its idle time), "count" (one
# more delivery) or "reset" (deliveries back to 1). Only while ``consumer`` holds the entry.
# Returns -1 when the entry is not pending (the job went final), 0 when another consumer
# holds it (nothing changed), else its delivery count after.
FT_KEEP = f"""
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], '{GROUP}', ARGV[2], ARGV[2], 1)
if not ok or #p == 0 then return -1 end
if p[1][2] ~= ARGV[1] then return 0 end
if ARGV[3] == 'count' then
  redis.call('XCLAIM', KEYS[1], '{GROUP}', ARGV[1], 0, ARGV[2])
  return p[1][4] + 1
end
if ARGV[3] == 'reset' then
  redis.call('XCLAIM', KEYS[1], '{GROUP}', ARGV[1], 0, ARGV[2], 'RETRYCOUNT', 1, 'JUSTID')
  return 1
end
redis.call('XCLAIM', KEYS[1], '{GROUP}', ARGV[1], 0, ARGV[2], 'JUSTID')
return p[1][4]
"""

# KEYS: job, lines, results, active | ARGV: entry_id, adapter, now_ms. Returns 0 when the job
# is gone or was already final, 1 completed (a CANCELLING job too: its adapter is served).
FT_COMPLETE = (
    FINALIZE_HELPERS
    + f"""
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if state == 0 or is_final(state) then return 0 end
redis.call('XACK', KEYS[2], '{GROUP}', ARGV[1])
local c = redis.call('HMGET', KEYS[1], 'total', 'failed')
redis.call('HSET', KEYS[1], 'completed', tonumber(c[1]) - tonumber(c[2]), 'adapter', ARGV[2],
           'train_node', '', 'predicted_ms', ARGV[3])
finalize(KEYS[1], KEYS[2], KEYS[4], {jobs_pb2.JOB_STATE_COMPLETED}, tonumber(ARGV[3]))
return 1
"""
)

# KEYS: job, lines, results, active | ARGV: error, now_ms. Returns 0 when the job is gone or
# already final, 1 failed (every example not counted yet counted failed).
FT_FAIL = (
    FINALIZE_HELPERS
    + f"""
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if state == 0 or is_final(state) then return 0 end
local f = redis.call('HMGET', KEYS[1], 'total', 'completed', 'failed', 'cancelled', 'expired')
local left = tonumber(f[1]) - tonumber(f[2]) - tonumber(f[3]) - tonumber(f[4]) - tonumber(f[5])
if left > 0 then redis.call('HINCRBY', KEYS[1], 'failed', left) end
redis.call('HSET', KEYS[1], 'error', ARGV[1], 'train_node', '')
finalize(KEYS[1], KEYS[2], KEYS[4], {_FAILED}, tonumber(ARGV[2]))
return 1
"""
)


def step_key(step: int) -> str:
    """The results field of a step."""
    return f"step-{step:08d}"


class FinetuneStore:
    """The fine-tune side of the jobs store (same Redis client as :class:`JobStore`)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis: Any = client
        self._commit = client.register_script(FT_COMMIT)
        self._record = client.register_script(FT_RECORD)
        self._complete = client.register_script(FT_COMPLETE)
        self._fail = client.register_script(FT_FAIL)
        self._stop = client.register_script(FT_STOP)
        self._keep = client.register_script(FT_KEEP)

    async def save_spec(self, job_id: str, spec: jobs_pb2.FinetuneSpec) -> None:
        """Keep the checked spec with the uploading job."""
        encoded = base64.b64encode(spec.SerializeToString()).decode()
        await self._redis.hset(JobKeys(job_id).job, SPEC_FIELD, encoded)

    async def spec(self, job_id: str) -> jobs_pb2.FinetuneSpec | None:
        """The job's spec (None: gone)."""
        raw = await self._redis.hget(JobKeys(job_id).job, SPEC_FIELD)
        return jobs_pb2.FinetuneSpec.FromString(base64.b64decode(raw)) if raw else None

    async def trained(self, job_id: str) -> str:
        """The adapter's path once a node wrote it ("" before)."""
        raw = await self._redis.hget(JobKeys(job_id).job, TRAINED_FIELD)
        return raw.decode() if raw else ""

    async def last_error(self, job_id: str) -> str:
        """The error the job's last failed attempt recorded ("" when none)."""
        raw = await self._redis.hget(JobKeys(job_id).job, LAST_ERROR_FIELD)
        return raw.decode(errors="replace") if raw else ""

    async def claim_holder(self, tenant: str, adapter_name: str) -> str | None:
        """The fine-tune job holding a live claim on the tenant's adapter name, if any."""
        holder = await self._redis.get(adapter_claim_key(tenant, adapter_name))
        if not holder:
            return None
        state = await self._redis.hget(JobKeys(holder.decode()).job, "state")
        live = state is not None and int(state) not in (0, _FAILED, _CANCELLED, _EXPIRED)
        return holder.decode() if live else None

    async def commit(
        self, record: JobRecord, adapter_name: str, idem_ttl_ms: int, claim_ttl_ms: int
    ) -> str:
        """Make the uploaded job visible (see ``FT_COMMIT``); returns its id or the id of the
        job its idempotency key names. Raises :class:`AdapterNameTaken` or UploadExpired."""
        keys = JobKeys(record.job_id)
        winner = await self._commit(
            keys=[
                keys.job,
                keys.lines,
                keys.results,
                ACTIVE_KEY,
                tenant_jobs_key(record.tenant),
                idempotency_key(record.tenant, record.idempotency_key),
                adapter_claim_key(record.tenant, adapter_name),
            ],
            args=[
                record.job_id,
                record.created_ms,
                record.deadline_ms,
                idem_ttl_ms,
                "1" if record.idempotency_key else "0",
                now_ms(),
                f"{PREFIX}:job:{{",
                claim_ttl_ms,
            ],
        )
        job_id = winner.decode() if isinstance(winner, bytes) else str(winner)
        if not job_id:
            raise UploadExpired(record.job_id)
        if job_id.startswith("!"):
            raise AdapterNameTaken(job_id[1:])
        return job_id

    async def examples(self, job_id: str) -> list[jobs_pb2.TrainingExample]:
        """The job's examples in submission order (empty: gone)."""
        lines = JobKeys(job_id).lines
        out: list[jobs_pb2.TrainingExample] = []
        start = "-"
        while True:
            entries = await self._redis.xrange(lines, start, "+", count=EXAMPLES_PAGE)
            for _entry_id, fields in entries:
                body = fields.get(b"b")
                if body:
                    out.append(jobs_pb2.JobLine.FromString(body).train)
            if len(entries) < EXAMPLES_PAGE:
                return out
            start = "(" + entries[-1][0].decode()

    async def record(
        self,
        job_id: str,
        fields: Mapping[str, str | int | float],
        step: jobs_pb2.TrainingStep | None = None,
        attempt: int = 1,
        *,
        started: bool = False,
    ) -> int:
        """Write progress ``fields`` (and a step's result) while the job is not final;
        ``started``: a node sent an event, so a QUEUED job is RUNNING now. See ``FT_RECORD``
        for the return codes."""
        keys = JobKeys(job_id)
        key, body = "", b""
        if step is not None:
            if not step.at_unix_ms:
                step = jobs_pb2.TrainingStep(
                    step=step.step,
                    loss=step.loss,
                    learning_rate=step.learning_rate,
                    tokens=step.tokens,
                    at_unix_ms=now_ms(),
                )
            key = step_key(step.step)
            body = jobs_pb2.JobResult(
                custom_id=key, step=step, deliveries=attempt, finished_at_unix_ms=now_ms()
            ).SerializeToString()
        pairs: list[str | int | float | bytes] = []
        for name, value in fields.items():
            pairs += [name, value]
        args = [key, body, now_ms(), "1" if started else "0", *pairs]
        code = await self._record(keys=[keys.job, keys.results], args=args)
        return int(code)

    async def stop(self, job_id: str, state: int) -> tuple[int, int]:
        """CANCELLED or EXPIRED now unless the adapter was written; ``(code, state after)``
        as ``FT_STOP`` returns them."""
        keys = JobKeys(job_id)
        code, after = await self._stop(
            keys=[keys.job, keys.lines, keys.results, ACTIVE_KEY], args=[state, now_ms()]
        )
        return int(code), int(after)

    async def complete(self, job_id: str, entry_id: str, adapter: str) -> bool:
        """COMPLETED with its adapter (``"<base>:<name>"``); False when it already was final."""
        keys = JobKeys(job_id)
        done = await self._complete(
            keys=[keys.job, keys.lines, keys.results, ACTIVE_KEY],
            args=[entry_id, adapter, now_ms()],
        )
        return bool(done)

    async def fail(self, job_id: str, error: str) -> bool:
        """FAILED with ``error``; False when it already was final."""
        keys = JobKeys(job_id)
        done = await self._fail(
            keys=[keys.job, keys.lines, keys.results, ACTIVE_KEY], args=[error, now_ms()]
        )
        return bool(done)

    async def keep(self, job_id: str, consumer: str, entry_id: str, mode: str = "touch") -> int:
        """The driver entry's heartbeat (``touch``), one more attempt (``count``) or attempts
        back to 1 (``reset``), only while ``consumer`` holds it: -1 when the job went final,
        0 when another consumer holds it now, else its delivery count (see ``FT_KEEP``)."""
        reply = await self._keep(keys=[JobKeys(job_id).lines], args=[consumer, entry_id, mode])
        return int(reply)

    async def redeliver(self, job_id: str, consumer: str, entry_id: str) -> int:
        """Count one more attempt of the driver entry this consumer holds; returns the count
        (0: the job went final, or another replica holds the entry now)."""
        return max(0, await self.keep(job_id, consumer, entry_id, "count"))

    async def owner(self, job_id: str, entry_id: str) -> str | None:
        """The consumer holding the driver entry ("" when nobody does; None when the job's
        stream is gone: it went final)."""
        lines = JobKeys(job_id).lines
        try:
            pending = await self._redis.xpending_range(lines, GROUP, entry_id, entry_id, 1)
        except redis.ResponseError:
            return None
        return pending[0]["consumer"].decode() if pending else ""

    async def reset_attempts(self, job_id: str, consumer: str, entry_id: str) -> None:
        """The job made progress (a new checkpoint): its attempts count from 1 again (only
        while this consumer holds the entry)."""
        await self.keep(job_id, consumer, entry_id, "reset")


class AdapterNameTaken(Exception):
    """Another live fine-tune job claimed the adapter name (``holder``: its id)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder
