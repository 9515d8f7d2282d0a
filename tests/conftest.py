"""Shared fixtures: real etcd and Redis servers (one each per test session, on free loopback
ports, in temp dirs), the tiny test models, and a fresh in-process suite per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from inference_node.models import Embedder, LanguageModel, load_embedder, load_language_model
from sluice.local.lockdown import Lockdown, enable_etcd_auth, prepare
from sluice.local.stores import StoreProcess, etcd_process, redis_process
from sluice.runtime.registry import etcd_client
from sluice.runtime.tls import Identity, Mesh, Role
from tests.harness import Suite, eventually

for _proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    os.environ.pop(_proxy, None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreProcess]:
    """A real etcd on a free loopback port."""
    base = tmp_path_factory.mktemp("etcd")
    proc = etcd_process(base / "data", base / "etcd.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreProcess]:
    """A real Redis on a free loopback port."""
    base = tmp_path_factory.mktemp("redis")
    proc = redis_process(base / "data", base / "redis.log").start()
    yield proc
    proc.stop()


SECURE_NODE_IDS = ("node-a", "node-b")
"""Nodes the locked-down stores have certificates and etcd users for."""


@pytest.fixture(scope="session")
def locked_stores(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Lockdown, StoreProcess, StoreProcess]]:
    """A CA with the suite's certificates, an etcd that speaks only mutual TLS with users per
    certificate and auth on, and a Redis whose only users are the cache and the scheduler
    (as `sluice up` sets them up)."""
    base = tmp_path_factory.mktemp("locked")
    lockdown = prepare(base, SECURE_NODE_IDS, ["127.0.0.1"])
    etcd = etcd_process(
        base / "etcd-data", base / "etcd.log", tls=lockdown.files(Identity(Role.ETCD))
    ).start()
    enable_etcd_auth(etcd.address, lockdown, SECURE_NODE_IDS)
    redis_store = redis_process(
        base / "redis-data", base / "redis.log", acl_file=lockdown.redis_acl
    ).start()
    yield lockdown, etcd, redis_store
    redis_store.stop()
    etcd.stop()


@pytest.fixture
async def secure_suite(
    locked_stores: tuple[Lockdown, StoreProcess, StoreProcess],
    tiny_lm: LanguageModel,
    minilm: Embedder,
    tmp_path: Path,
) -> AsyncIterator[Suite]:
    """A fresh suite (nothing started yet) on the locked-down stores: every hop mutual TLS."""
    lockdown, etcd, redis_store = locked_stores
    root = etcd_client(etcd.address, mesh=Mesh(lockdown.files(Identity(Role.ROOT))))
    await root.delete_prefix(b"/sluice/")
    await root.close()
    s = Suite(
        etcd=etcd.address,
        redis_url=f"redis://{redis_store.address}/0",
        generators={tiny_lm.name: tiny_lm},
        embedders={minilm.name: minilm},
        tmp=tmp_path,
        lockdown=lockdown,
    )
    yield s
    await s.stop()


@pytest.fixture
async def etcd(etcd_server: StoreProcess) -> AsyncIterator[str]:
    """The etcd endpoint, with every /sluice/ key removed before the test."""
    client = etcd_client(etcd_server.address)
    await client.delete_prefix(b"/sluice/")
    await client.close()
    yield etcd_server.address


@pytest.fixture
async def redis_url(redis_server: StoreProcess) -> AsyncIterator[str]:
    """A Redis URL on a database flushed before the test."""
    url = f"redis://{redis_server.address}/0"
    client = redis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    yield url


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> LanguageModel:
    """The seeded tiny Llama (built in-process)."""
    return load_language_model("tiny-random-llama", cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The per-session model cache the ``smollm2`` fixture converts into."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def smollm2(smollm2_cache: Path) -> LanguageModel:
    """SmolLM2 converted from its GGUF into a per-session cache (~25 s on two cores): the
    conversion path is tested on every run, not only on machines without a cache."""
    return load_language_model("smollm2-135m-instruct", cache_dir=smollm2_cache)


@pytest.fixture(scope="session")
def minilm() -> Embedder:
    """all-MiniLM-L6-v2 from its wheel."""
    return load_embedder("all-minilm-l6-v2")


@pytest.fixture
async def suite(
    etcd: str, redis_url: str, tiny_lm: LanguageModel, minilm: Embedder, tmp_path: Path
) -> AsyncIterator[Suite]:
    """A fresh suite (nothing started yet) torn down after the test."""
    s = Suite(
        etcd=etcd,
        redis_url=redis_url,
        generators={tiny_lm.name: tiny_lm},
        embedders={minilm.name: minilm},
        tmp=tmp_path,
    )
    yield s
    await s.stop()


@pytest.fixture
async def running(suite: Suite) -> Suite:
    """Cache, one node and a scheduler, with the node visible to the scheduler."""
    await suite.start_cache()
    await suite.start_node("node-a")
    scheduler = await suite.start_scheduler()
    await eventually(lambda: scheduler.nodes.candidates("tiny-random-llama", 1))
    return suite
