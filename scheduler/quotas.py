"""Global per-tenant quotas: token buckets in Redis, one Lua script, one round trip.

Every scheduler replica runs the same script against the same keys, so the limits hold across
replicas. The script reads Redis's own ``TIME`` (no clock skew between replicas), refills the
buckets, and then either takes from all of them or from none:

- ``requests_per_second``: a bucket of ``burst`` requests refilled at the rate;
- ``tokens_per_minute``: a bucket of that many tokens refilled continuously; a request takes
  its estimate (prompt + ``max_new_tokens``) and the difference to what it really used is
  given back (or taken) on release, so the bucket counts tokens actually processed;
- ``max_concurrent``: a sorted set of leases scored by expiry (the request's deadline plus a
  margin), so a replica that dies leaks its slots only until they expire.

Over quota → ``RESOURCE_EXHAUSTED`` with ``QuotaFailure`` naming each exceeded quota and
``RetryInfo`` from the bucket refill (the time until enough has refilled; a fixed hint for the
concurrency cap, which frees when some request ends).

Refusals are remembered locally (as the over-limit key cache of Envoy's ratelimit service
does): a tenant whose requests-per-second bucket is empty cannot get a request through before
the refill time Redis reported, whichever replica asks, so until then this replica refuses it
without a round trip (the tokens-per-minute bucket likewise, from the level Redis reported,
for at most ``NEGATIVE_CACHE_MAX_S``: tokens given back on release can raise it early). A flood
over quota then costs no Redis traffic and its refusals no network wait. The concurrency cap is
not remembered: a slot frees whenever one of the tenant's requests ends, on any replica.

Redis unreachable: the call fails within ``timeout_s`` (no retries: the script is not
idempotent), a breaker skips Redis for a second after three failures in a row, and each
quota follows its documented policy: quotas listed in ``fail_closed`` refuse (``UNAVAILABLE``,
``QUOTA_BACKEND_UNAVAILABLE``); the others fail open — the request goes on, with
``max_concurrent`` still enforced per replica from local counts. Both cases count in
``sluice_scheduler_quota_checks_total{result}`` and log ``quota_backend_unavailable``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

import redis.asyncio as redis
import structlog
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from scheduler.metrics import SchedulerMetrics
from scheduler.tenants import Quotas, Tenant
from sluice.runtime.breaker import BreakerConfig, CircuitBreaker
from sluice.runtime.errors import ResourceExhausted, Unavailable

log = structlog.get_logger(__name__)

QUOTA_NAMES = ("requests_per_second", "tokens_per_minute", "max_concurrent")
CONCURRENCY_RETRY_S = 0.5
"""Retry hint for the concurrency cap: a slot frees when one of the tenant's requests ends."""
BACKEND_RETRY_S = 1.0
LEASE_MARGIN_S = 5.0
NEGATIVE_CACHE_MAX_S = 0.5
"""Longest a tokens-per-minute refusal is reused without asking Redis again."""

# KEYS: requests bucket, tokens bucket, concurrency leases.
# ARGV: mode, rps, burst, tokens_per_minute, tokens (acquire: need; release: refund),
#       max_concurrent, lease id, lease ms.
# Returns {admitted, rps wait ms, tokens wait ms, concurrency full, leases in use}.
SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rps, burst, tpm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, maxc, lease_ms = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[8])
local function level(key, cap, per_ms)
  local v = redis.call('HMGET', key, 'tokens', 'ts')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * per_ms)
end
local function store(key, value, ttl_ms)
  redis.call('HSET', key, 'tokens', tostring(value), 'ts', now)
  redis.call('PEXPIRE', key, ttl_ms)
end
if ARGV[1] == 'release' then
  redis.call('ZREM', KEYS[3], ARGV[7])
  if tpm > 0 and tokens ~= 0 then
    store(KEYS[2], math.min(tpm, level(KEYS[2], tpm, tpm / 60000) + tokens), 61000)
  end
  return {1, 0, 0, 0, 0}
end
local rps_wait, tpm_wait, full, inflight = 0, 0, 0, 0
local r_level, t_level = 0, 0
if rps > 0 then
  r_level = level(KEYS[1], burst, rps / 1000)
  if r_level < 1 then rps_wait = math.ceil((1 - r_level) / (rps / 1000)) end
end
if tpm > 0 then
  tokens = math.min(tokens, tpm)
  t_level = level(KEYS[2], tpm, tpm / 60000)
  if t_level < tokens then tpm_wait = math.ceil((tokens - t_level) / (tpm / 60000)) end
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[3])
  if inflight >= maxc then full = 1 end
end
if rps_wait > 0 or tpm_wait > 0 or full > 0 then
  return {0, rps_wait, tpm_wait, full, inflight}
end
if rps > 0 then store(KEYS[1], r_level - 1, math.ceil(burst / rps * 1000) + 1000) end
if tpm > 0 then store(KEYS[2], t_level - tokens, 61000) end
if maxc > 0 then
  redis.call('ZADD', KEYS[3], now + lease_ms, ARGV[7])
  redis.call('PEXPIRE', KEYS[3], lease_ms + 1000)
  inflight = inflight + 1
end
return {1, 0, 0, 0, inflight}
"""


def quota_redis(url: str, timeout_s: float) -> redis.Redis:
    """A client for the quota buckets that fails within ``timeout_s`` and never retries."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


@dataclass(frozen=True)
class _Denial:
    """What Redis said about a tenant's empty buckets, for refusing locally until refill."""

    quotas: Quotas
    """The quotas it was computed under (a live config change invalidates it)."""
    checked_at: float
    rps_until: float
    """Monotonic time the requests bucket holds one request again (0: it was not empty)."""
    tpm_level: float
    """Tokens in the tokens-per-minute bucket at ``checked_at`` (inf: not limiting)."""

    def waits(self, quotas: Quotas, tokens: int, now: float) -> tuple[float, float] | None:
        """(requests wait, tokens wait) in seconds if a request of ``tokens`` is still
        refused at ``now``; None when Redis must be asked."""
        if quotas != self.quotas:
            return None
        rps_wait = max(0.0, self.rps_until - now)
        tpm_wait = 0.0
        if math.isfinite(self.tpm_level) and now - self.checked_at < NEGATIVE_CACHE_MAX_S:
            per_s = quotas.tokens_per_minute / 60.0
            level = self.tpm_level + (now - self.checked_at) * per_s
            need = min(tokens, quotas.tokens_per_minute)
            if level < need:
                tpm_wait = (need - level) / per_s
        if rps_wait <= 0 and tpm_wait <= 0:
            return None
        return rps_wait, tpm_wait


@dataclass
class Lease:
    """What one admitted request holds; give it back with :meth:`QuotaGate.release`."""

    tenant: str
    lease_id: str
    quotas: Quotas
    tokens: int
    """Tokens taken from the tokens-per-minute bucket at admission."""
    global_: bool
    """True when Redis granted it (so Redis must be told on release)."""


def _retrieved(task: asyncio.Task[Lease]) -> None:
    if not task.cancelled():
        task.exception()


class QuotaCheck:
    """A quota answer that may still be on its way from Redis (see :meth:`QuotaGate.check`)."""

    def __init__(self, lease: Lease | None = None, pending: asyncio.Task[Lease] | None = None):
        self._lease = lease
        self._pending = pending

    @property
    def lease(self) -> Lease | None:
        """The lease once granted (None while pending or after a refusal)."""
        return self._lease

    async def granted(self) -> Lease:
        """Wait for the answer: the lease, or the refusal raised."""
        if self._lease is None:
            assert self._pending is not None
            # Shielded: a client that leaves must not cut a Redis call short (redis-py drops
            # the connection then); the lease it may grant is released by when_granted.
            self._lease = await asyncio.shield(self._pending)
        return self._lease

    def when_granted(self, settle: Callable[[Lease], None]) -> None:
        """Call ``settle`` with the lease now if it is known, or when (and if) it arrives."""
        if self._lease is not None:
            settle(self._lease)
            return
        task = self._pending
        if task is None:
            return

        def done(t: asyncio.Task[Lease]) -> None:
            if not t.cancelled() and t.exception() is None:
                settle(t.result())

        task.add_done_callback(done)


class QuotaGate:
    """Admits requests against their tenant's global quotas."""

    def __init__(
        self,
        client: redis.Redis | None,
        metrics: SchedulerMetrics,
        *,
        fail_closed: Collection[str] = (),
        key_prefix: str = "sluice:quota:v1",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        unknown = set(fail_closed) - set(QUOTA_NAMES)
        if unknown:
            raise ValueError(f"unknown quotas {sorted(unknown)}; use {list(QUOTA_NAMES)}")
        self._client = client
        self._script = client.register_script(SCRIPT) if client is not None else None
        self._metrics = metrics
        self._fail_closed = frozenset(fail_closed)
        self._prefix = key_prefix
        # Three consecutive failures before Redis is skipped: one slow reply on a starved event
        # loop (seen under saturation on 2 cores) must fail open for that request only, not
        # lift every quota for a second.
        self._breaker = CircuitBreaker(
            BreakerConfig(failure_threshold=3, open_s=1.0, max_open_s=5.0)
        )
        self._local: dict[str, int] = {}
        self._denied: dict[str, _Denial] = {}
        self._clock = clock

    def _keys(self, tenant: str) -> list[str]:
        base = f"{self._prefix}:{{{tenant}}}"  # one hash slot per tenant (Redis Cluster)
        return [f"{base}:rps", f"{base}:tpm", f"{base}:conc"]

    async def check(
        self, tenant: Tenant, tokens: int, lease_id: str, lease_s: float, *, overlap: bool
    ) -> QuotaCheck:
        """Like :meth:`acquire`, but with ``overlap`` a check that needs Redis is left running
        (the caller goes on and awaits :meth:`QuotaCheck.granted` before its first token).
        Tenants without quotas and refusals remembered locally are answered at once."""
        q = tenant.quotas
        if not overlap or not q.any or tenant.name in self._denied:
            return QuotaCheck(await self.acquire(tenant, tokens, lease_id, lease_s))
        task = asyncio.ensure_future(
            self._acquire_after_dispatch(tenant, tokens, lease_id, lease_s)
        )
        task.add_done_callback(_retrieved)  # a refusal nobody awaits is not an error
        return QuotaCheck(pending=task)

    async def _acquire_after_dispatch(
        self, tenant: Tenant, tokens: int, lease_id: str, lease_s: float
    ) -> Lease:
        """:meth:`acquire`, one loop turn late: the caller's node call, started in the same
        turn (grpc.aio sends it from a task of its own), goes out first
        (docs/decisions/scheduler-quota-after-node-call.md)."""
        await asyncio.sleep(0)
        return await self.acquire(tenant, tokens, lease_id, lease_s)

    async def acquire(self, tenant: Tenant, tokens: int, lease_id: str, lease_s: float) -> Lease:
        """Take one request and ``tokens`` from ``tenant``'s quotas, or raise.

        Raises :class:`ResourceExhausted` (``QUOTA_EXCEEDED``) over quota, and
        :class:`Unavailable` when Redis is down and a set quota fails closed.
        """
        q = tenant.quotas
        if not q.any:
            return Lease(tenant.name, lease_id, q, 0, global_=False)
        denial = self._denied.get(tenant.name)
        if denial is not None:
            waits = denial.waits(q, tokens, self._clock())
            if waits is not None:
                self._metrics.quota_checks.labels("exceeded_cached").inc()
                raise self._exceeded(tenant, waits[0], waits[1], full=False)
            del self._denied[tenant.name]
        reply = None
        if self._script is not None and self._breaker.allow():
            lease_ms = math.ceil((lease_s + LEASE_MARGIN_S) * 1000)
            args: list[str | int | float] = [
                "acquire", q.requests_per_second, q.bucket_size, q.tokens_per_minute,
                tokens, q.max_concurrent, lease_id, lease_ms,
            ]  # fmt: skip
            try:
                reply = await self._script(keys=self._keys(tenant.name), args=args)
                self._breaker.record_success()
                self._metrics.quota_backend_up.set(1)
            except (RedisError, OSError) as exc:
                self._breaker.record_failure()
                self._metrics.quota_backend_up.set(0)
                log.warning("quota_backend_unavailable", tenant=tenant.name, error=repr(exc))
        if reply is None:
            return self._degraded(tenant, tokens, lease_id)
        admitted, rps_wait, tpm_wait, full, _ = (int(x) for x in reply)
        if admitted:
            self._metrics.quota_checks.labels("ok").inc()
            return Lease(tenant.name, lease_id, q, tokens, global_=True)
        self._metrics.quota_checks.labels("exceeded").inc()
        if rps_wait or tpm_wait:
            now = self._clock()
            need = min(tokens, q.tokens_per_minute)
            self._denied[tenant.name] = _Denial(
                quotas=q,
                checked_at=now,
                rps_until=now + rps_wait / 1000 if rps_wait else 0.0,
                tpm_level=need - tpm_wait / 1000 * q.tokens_per_minute / 60
                if tpm_wait
                else math.inf,
            )
        raise self._exceeded(tenant, rps_wait / 1000, tpm_wait / 1000, bool(full))

    @staticmethod
    def _exceeded(
        tenant: Tenant, rps_wait: float, tpm_wait: float, full: bool
    ) -> ResourceExhausted:
        """The over-quota refusal naming each exceeded quota, retry after the longest wait."""
        q = tenant.quotas
        violations: list[tuple[str, str]] = []
        waits: list[float] = []
        if rps_wait:
            violations.append(
                (f"tenant:{tenant.name}/requests_per_second", f"limit {q.requests_per_second}/s")
            )
            waits.append(rps_wait)
        if tpm_wait:
            violations.append(
                (f"tenant:{tenant.name}/tokens_per_minute", f"limit {q.tokens_per_minute}/min")
            )
            waits.append(tpm_wait)
        if full:
            violations.append(
                (f"tenant:{tenant.name}/max_concurrent", f"limit {q.max_concurrent} in flight")
            )
            waits.append(CONCURRENCY_RETRY_S)
        return ResourceExhausted(
            f"tenant {tenant.name!r} is over quota: " + ", ".join(d for _, d in violations),
            retry_after_s=max(waits),
            reason="QUOTA_EXCEEDED",
            quota_violations=violations,
        )

    def _degraded(self, tenant: Tenant, tokens: int, lease_id: str) -> Lease:
        """Redis is unreachable: apply each set quota's fail-open / fail-closed policy."""
        q = tenant.quotas
        closed = [n for n in QUOTA_NAMES if getattr(q, n) and n in self._fail_closed]
        if closed:
            self._metrics.quota_checks.labels("fail_closed").inc()
            raise Unavailable(
                f"quota store unreachable; {', '.join(closed)} fail closed",
                retry_after_s=BACKEND_RETRY_S,
                reason="QUOTA_BACKEND_UNAVAILABLE",
            )
        self._metrics.quota_checks.labels("fail_open").inc()
        held = self._local.get(tenant.name, 0)
        if q.max_concurrent and held >= q.max_concurrent:  # per-replica fallback
            raise ResourceExhausted(
                f"tenant {tenant.name!r} is over quota: limit {q.max_concurrent} in flight",
                retry_after_s=CONCURRENCY_RETRY_S,
                reason="QUOTA_EXCEEDED",
                quota_violations=[(f"tenant:{tenant.name}/max_concurrent", "local fallback")],
            )
        self._local[tenant.name] = held + 1
        return Lease(tenant.name, lease_id, q, tokens, global_=False)

    async def release(self, lease: Lease, used_tokens: int) -> None:
        """Free the lease's concurrency slot and settle its tokens with what it really used."""
        if not lease.global_:
            if lease.quotas.any:
                self._local[lease.tenant] = max(0, self._local.get(lease.tenant, 0) - 1)
            return
        q = lease.quotas
        denial = self._denied.get(lease.tenant)
        if denial is not None and used_tokens < lease.tokens:  # a refund raises the level
            self._denied[lease.tenant] = replace(denial, tpm_level=math.inf)
        if not q.max_concurrent and not (q.tokens_per_minute and used_tokens != lease.tokens):
            return
        if self._script is None or not self._breaker.allow():
            return  # the lease expires by itself
        args: list[str | int | float] = [
            "release", 0, 0, q.tokens_per_minute, lease.tokens - used_tokens,
            q.max_concurrent, lease.lease_id, 0,
        ]  # fmt: skip
        try:
            await self._script(keys=self._keys(lease.tenant), args=args)
        except (RedisError, OSError) as exc:
            self._breaker.record_failure()
            log.warning("quota_release_failed", tenant=lease.tenant, error=repr(exc))

    async def close(self) -> None:
        """Close the Redis connection pool."""
        if self._client is not None:
            await self._client.aclose()
