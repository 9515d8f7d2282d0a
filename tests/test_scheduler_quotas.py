"""Global quotas against the real Redis fixture: one Lua script, shared across replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from google.rpc import error_details_pb2
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from scheduler.metrics import SchedulerMetrics
from scheduler.quotas import QuotaGate, quota_redis
from scheduler.tenants import Quotas, Tenant
from sluice.local.stores import free_port
from sluice.runtime.errors import ResourceExhausted, Unavailable


def tenant(name: str = "acme", **quotas: float) -> Tenant:
    return Tenant(name, 1.0, frozenset({1}), frozenset({"*"}), (), quotas=Quotas(**quotas))  # type: ignore[arg-type]


@pytest.fixture
async def gates(redis_url: str) -> AsyncIterator[tuple[QuotaGate, QuotaGate, CollectorRegistry]]:
    """Two gates with their own clients, as two scheduler replicas would have."""
    registry = CollectorRegistry()
    metrics = SchedulerMetrics(registry)
    a = QuotaGate(quota_redis(redis_url, 0.1), metrics)
    b = QuotaGate(quota_redis(redis_url, 0.1), SchedulerMetrics(CollectorRegistry()))
    yield a, b, registry
    await a.close()
    await b.close()


def retry_of(exc: ResourceExhausted) -> float:
    (retry,) = [d for d in exc.details() if isinstance(d, error_details_pb2.RetryInfo)]
    return retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9


def subjects(exc: ResourceExhausted) -> list[str]:
    (failure,) = [d for d in exc.details() if isinstance(d, error_details_pb2.QuotaFailure)]
    return [v.subject for v in failure.violations]


async def test_requests_per_second_bucket_refuses_with_retry_from_refill(
    gates: tuple[QuotaGate, QuotaGate, CollectorRegistry],
) -> None:
    """2 req/s, burst 2: two pass, the third is refused with QuotaFailure and a retry delay
    of about the 0.5 s the bucket needs to refill one request."""
    gate, _, _ = gates
    t = tenant(requests_per_second=2)
    await gate.acquire(t, 10, "r1", 5)
    await gate.acquire(t, 10, "r2", 5)
    with pytest.raises(ResourceExhausted) as err:
        await gate.acquire(t, 10, "r3", 5)
    assert err.value.reason == "QUOTA_EXCEEDED"
    assert subjects(err.value) == ["tenant:acme/requests_per_second"]
    assert 0.3 < retry_of(err.value) <= 0.5
    assert err.value.retry_after() == retry_of(err.value)


async def test_tokens_per_minute_retry_is_time_to_refill_the_missing_tokens(
    gates: tuple[QuotaGate, QuotaGate, CollectorRegistry],
) -> None:
    """600 tokens/min (10/s): after 500, a request for 500 lacks 400 tokens, i.e. 40 s."""
    gate, _, _ = gates
    t = tenant(tokens_per_minute=600)
    await gate.acquire(t, 500, "r1", 5)
    with pytest.raises(ResourceExhausted) as err:
        await gate.acquire(t, 500, "r2", 5)
    assert subjects(err.value) == ["tenant:acme/tokens_per_minute"]
    assert 39.0 < retry_of(err.value) <= 40.0


async def test_release_settles_tokens_with_what_was_really_used(
    gates: tuple[QuotaGate, QuotaGate, CollectorRegistry],
) -> None:
    """A request estimated at 1,000 tokens that used 100 gives 900 back on release."""
    gate, _, _ = gates
    t = tenant(tokens_per_minute=1000)
    lease = await gate.acquire(t, 1000, "r1", 5)
    with pytest.raises(ResourceExhausted):
        await gate.acquire(t, 800, "r2", 5)
    await gate.release(lease, 100)
    await gate.acquire(t, 800, "r3", 5)


async def test_concurrency_cap_frees_on_release(
    gates: tuple[QuotaGate, QuotaGate, CollectorRegistry],
) -> None:
    """max_concurrent 2: the third waits for a release; refusals and admissions are atomic
    (a refused request takes nothing from the other buckets)."""
    gate, _, _ = gates
    t = tenant(max_concurrent=2, requests_per_second=100)
    first = await gate.acquire(t, 1, "r1", 5)
    await gate.acquire(t, 1, "r2", 5)
    with pytest.raises(ResourceExhausted) as err:
        await gate.acquire(t, 1, "r3", 5)
    assert subjects(err.value) == ["tenant:acme/max_concurrent"]
    await gate.release(first, 1)
    await gate.acquire(t, 1, "r4", 5)


async def test_two_replicas_share_one_bucket(
    gates: tuple[QuotaGate, QuotaGate, CollectorRegistry],
) -> None:
    """Quotas are global: requests alternating between two replicas drain one bucket, and
    another tenant's bucket is untouched."""
    a, b, _ = gates
    t = tenant(requests_per_second=3)
    for i, gate in enumerate((a, b, a)):
        await gate.acquire(t, 1, f"r{i}", 5)
    with pytest.raises(ResourceExhausted):
        await b.acquire(t, 1, "r4", 5)
    await b.acquire(tenant("other", requests_per_second=3), 1, "o1", 5)


async def test_tenant_without_quotas_never_touches_redis() -> None:
    """No quota set: admitted without any Redis call (the client points nowhere)."""
    gate = QuotaGate(
        quota_redis(f"redis://127.0.0.1:{free_port()}/0", 0.05),
        SchedulerMetrics(CollectorRegistry()),
    )
    lease = await gate.acquire(tenant(), 10, "r1", 5)
    assert not lease.global_
    await gate.close()


async def test_redis_down_fails_open_fast_with_metric_and_log() -> None:
    """Redis unreachable: default policy fails open within the timeout (never a hang),
    counts fail_open, logs quota_backend_unavailable; after three failures in a row Redis is
    skipped; the concurrency cap still holds per replica."""
    registry = CollectorRegistry()
    gate = QuotaGate(
        quota_redis(f"redis://127.0.0.1:{free_port()}/0", 0.05), SchedulerMetrics(registry)
    )
    t = tenant(requests_per_second=1, max_concurrent=3)
    started = time.perf_counter()
    with capture_logs() as logs:
        for rid in ("r1", "r2", "r3"):
            await gate.acquire(t, 1, rid, 5)
    assert time.perf_counter() - started < 1.5
    assert [e["event"] for e in logs].count("quota_backend_unavailable") == 3
    with capture_logs() as logs, pytest.raises(ResourceExhausted):
        await gate.acquire(t, 1, "r4", 5)  # breaker open: no Redis call, local cap refuses
    assert not any(e["event"] == "quota_backend_unavailable" for e in logs)
    value = registry.get_sample_value(
        "sluice_scheduler_quota_checks_total", {"result": "fail_open"}
    )
    assert value == 4
    assert registry.get_sample_value("sluice_scheduler_quota_backend_up") == 0
    await gate.close()


async def test_redis_down_fails_closed_for_listed_quotas() -> None:
    """A quota listed as fail-closed refuses with UNAVAILABLE and a retry delay."""
    gate = QuotaGate(
        quota_redis(f"redis://127.0.0.1:{free_port()}/0", 0.05),
        SchedulerMetrics(CollectorRegistry()),
        fail_closed=["tokens_per_minute"],
    )
    with pytest.raises(Unavailable) as err:
        await gate.acquire(tenant(tokens_per_minute=100), 1, "r1", 5)
    assert err.value.reason == "QUOTA_BACKEND_UNAVAILABLE"
    assert err.value.retry_after() == 1.0
    await gate.acquire(tenant("open", requests_per_second=5), 1, "r2", 5)  # fails open
    await gate.close()


async def test_over_quota_refusal_is_fast(
    gates: tuple[QuotaGate, QuotaGate, CollectorRegistry],
) -> None:
    """Over-quota refusal takes one round trip: p99 of 200 refusals well under 5 ms."""
    gate, _, _ = gates
    t = tenant(requests_per_second=0.001)
    await gate.acquire(t, 1, "first", 5)
    times = []
    for i in range(200):
        started = time.perf_counter()
        with pytest.raises(ResourceExhausted):
            await gate.acquire(t, 1, f"r{i}", 5)
        times.append(time.perf_counter() - started)
    times.sort()
    p99 = times[int(len(times) * 0.99) - 1]
    assert p99 < 0.005


async def test_refusal_is_remembered_until_the_bucket_refills(
    gates: tuple[QuotaGate, QuotaGate, CollectorRegistry],
) -> None:
    """Once Redis says the requests bucket is empty, this replica refuses locally (counted as
    exceeded_cached, same details, a retry delay that shrinks) until the refill time; a live
    quota change is asked of Redis again at once."""
    gate, _, registry = gates
    t = tenant(requests_per_second=2, burst=1)
    await gate.acquire(t, 1, "r1", 5)
    with pytest.raises(ResourceExhausted) as first:
        await gate.acquire(t, 1, "r2", 5)
    with pytest.raises(ResourceExhausted) as cached:
        await gate.acquire(t, 1, "r3", 5)
    assert subjects(cached.value) == ["tenant:acme/requests_per_second"]
    assert 0 < retry_of(cached.value) <= retry_of(first.value) <= 0.5
    counts = {
        r: registry.get_sample_value("sluice_scheduler_quota_checks_total", {"result": r})
        for r in ("ok", "exceeded", "exceeded_cached")
    }
    assert counts == {"ok": 1, "exceeded": 1, "exceeded_cached": 1}
    raised = tenant(requests_per_second=1000)  # new quotas: the old answer no longer holds
    await asyncio.sleep(0.01)  # the emptied bucket refills one request per ms at the new rate
    await gate.acquire(raised, 1, "r4", 5)
    await asyncio.sleep(retry_of(cached.value) + 0.05)
    await gate.acquire(t, 1, "r5", 5)  # refilled: Redis is asked again and admits
