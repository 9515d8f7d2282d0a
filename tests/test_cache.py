"""The response cache against a real Redis, and without one."""

from __future__ import annotations

import time

import grpc
from prometheus_client import CollectorRegistry

from cache_service.app import CacheService
from cache_service.cache import ResponseCache
from cache_service.config import CacheSettings
from cache_service.store import RedisStore, fail_fast_redis
from sluice.local.stores import free_port
from sluice.runtime.breaker import BreakerState
from sluice.runtime.cache_keys import cache_key, is_cacheable
from sluice.v1 import cache_pb2, cache_pb2_grpc, common_pb2, inference_pb2


def req(prompt: str = "hi", model: str = "m", **options: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        options=common_pb2.GenerationOptions(**options),  # type: ignore[arg-type]
    )


def answer(text: str = "hello") -> cache_pb2.CachedResponse:
    return cache_pb2.CachedResponse(
        text=text, token_ids=[1, 2], finish_reason=common_pb2.FINISH_REASON_EOS, node_id="n"
    )


def test_keys_are_tenant_scoped_and_stable() -> None:
    """Same request, same key (SHA-256, not hash()); another tenant, another key."""
    a = cache_key("acme", req(max_new_tokens=5))
    assert a == cache_key("acme", req(max_new_tokens=5))
    assert a != cache_key("other", req(max_new_tokens=5))
    assert a != cache_key("acme", req(max_new_tokens=6))
    assert a.startswith("sluice:cache:v1:acme:m:") and len(a.rsplit(":", 1)[1]) == 64


def test_greedy_requests_ignore_sampling_knobs_in_the_key() -> None:
    """temperature=0 makes top_p and seed irrelevant, so they do not split the cache."""
    assert cache_key("t", req(temperature=0.0, top_p=0.5)) == cache_key("t", req())


def test_names_cannot_break_key_structure() -> None:
    """Tenant or model names with ':' or glob characters are encoded, never raw."""
    key = cache_key("a:b*", req(model="m?[x]"))
    assert key.count(":") == 5
    assert "*" not in key and "?" not in key


def test_only_deterministic_requests_are_cacheable() -> None:
    """Greedy or seeded: cacheable. Sampled without seed, or bypass: not."""
    assert is_cacheable(req())
    assert is_cacheable(req(temperature=0.7, seed=3))
    assert not is_cacheable(req(temperature=0.7))
    bypass = req()
    bypass.cache_bypass = True
    assert not is_cacheable(bypass)


async def test_store_lookup_ttl_and_invalidate_on_real_redis(redis_url: str) -> None:
    """Entries round-trip with a TTL and invalidation removes only that tenant's model."""
    store = RedisStore(fail_fast_redis(redis_url))
    cache = ResponseCache(store, default_ttl_s=60)
    assert (await cache.store("t1", req("a"), answer("A"))).stored
    assert (await cache.store("t1", req("b", model="m2"), answer("B"))).stored
    assert (await cache.store("t2", req("a"), answer("C"))).stored
    hit = await cache.lookup("t1", req("a"))
    assert hit.response is not None and hit.response.text == "A"
    assert hit.response.stored_at_unix_ms > 0
    ttl = await store._client.ttl(hit.key)
    assert 0 < ttl <= 60
    assert await cache.invalidate("t1", "m") == 1
    assert (await cache.lookup("t1", req("a"))).response is None
    assert (await cache.lookup("t1", req("b", model="m2"))).response is not None
    assert (await cache.lookup("t2", req("a"))).response is not None
    await store.close()


async def test_oversized_entries_are_not_stored(redis_url: str) -> None:
    """An entry over max_entry_bytes is refused with reason too_large."""
    store = RedisStore(fail_fast_redis(redis_url))
    cache = ResponseCache(store, max_entry_bytes=100)
    result = await cache.store("t", req(), answer("x" * 500))
    assert not result.stored and result.reason == "too_large"
    await store.close()


async def test_dead_redis_means_fast_misses_and_an_open_breaker() -> None:
    """With Redis down lookups miss in well under a second each, and after a few failures
    the breaker stops calling Redis at all."""
    store = RedisStore(fail_fast_redis(f"redis://127.0.0.1:{free_port()}/0"))
    cache = ResponseCache(store)
    started = time.perf_counter()
    for _ in range(5):
        assert (await cache.lookup("t", req())).response is None
    assert time.perf_counter() - started < 2.5
    assert store.breaker.state is BreakerState.OPEN
    assert not cache.available()
    errors_before = store.errors
    started = time.perf_counter()
    assert (await cache.lookup("t", req())).response is None
    assert time.perf_counter() - started < 0.05
    assert store.errors == errors_before  # the breaker answered, Redis was not asked
    assert (await cache.store("t", req(), answer())).reason == "redis_unavailable"
    await store.close()


async def test_cache_service_over_grpc_degrades_to_misses_without_redis() -> None:
    """The gRPC Lookup answers hit=false (not an error) while Redis is unreachable."""
    settings = CacheSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    service = CacheService(settings, CollectorRegistry())
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            reply = await stub.Lookup(cache_pb2.LookupRequest(tenant="t", request=req()))
            assert not reply.hit and reply.cacheable
            stats = await stub.Stats(cache_pb2.StatsRequest())
            assert stats.errors >= 1
    finally:
        await service.stop(0)
