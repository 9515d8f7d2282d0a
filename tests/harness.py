"""Test harness: the services in-process on ephemeral ports, against real etcd and Redis.

Everything binds 127.0.0.1 port 0; nothing is mocked. Fault injection goes through the real
objects (``NodeService.crash`` stops a node without deregistering, as ``kill -9`` would).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from cache_service.app import CacheService
from cache_service.config import CacheSettings
from inference_node.app import NodeService
from inference_node.config import NodeSettings
from inference_node.models import Embedder, LanguageModel
from scheduler.app import SchedulerService
from scheduler.config import SchedulerSettings
from scheduler.tenants import Tenant, TenantDirectory
from sluice.contract import NODES_PREFIX
from sluice.local.lockdown import Lockdown
from sluice.runtime.auth import hash_api_key
from sluice.runtime.registry import Registration, etcd_client
from sluice.runtime.tls import Identity, Mesh, Role, node_identity
from sluice.v1 import (
    admin_pb2_grpc,
    cache_pb2_grpc,
    common_pb2,
    inference_pb2_grpc,
    jobs_pb2_grpc,
    node_pb2_grpc,
)

API_KEY = "sk-sluice-test-key-alpha"
OTHER_KEY = "sk-sluice-test-key-beta"


def test_tenants() -> TenantDirectory:
    """Two tenants with known keys."""
    every_class = frozenset(
        {
            common_pb2.WORKLOAD_CLASS_REALTIME,
            common_pb2.WORKLOAD_CLASS_BATCH,
            common_pb2.WORKLOAD_CLASS_FINETUNE,
        }
    )
    return TenantDirectory(
        [
            Tenant(
                "alpha", 2.0, every_class, frozenset({"*"}), (hash_api_key(API_KEY),), admin=True
            ),
            Tenant(
                "beta",
                1.0,
                frozenset({common_pb2.WORKLOAD_CLASS_BATCH}),
                frozenset({"tiny-random-llama"}),
                (hash_api_key(OTHER_KEY),),
            ),
        ]
    )


async def eventually(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until truthy; fail with its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)


@dataclass
class Suite:
    """Cache service, nodes and a scheduler running in this event loop."""

    etcd: str
    redis_url: str
    generators: dict[str, LanguageModel]
    embedders: dict[str, Embedder]
    tmp: Path
    cache: CacheService | None = None
    scheduler: SchedulerService | None = None
    nodes: list[NodeService] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    lockdown: Lockdown | None = None
    """Set: every hop is mutual TLS with these certificates, etcd and Redis want users."""

    def tls(self, identity: Identity) -> dict[str, str]:
        """Settings giving a service ``identity``'s certificate (none when plaintext)."""
        if self.lockdown is None:
            return {}
        files = self.lockdown.files(identity)
        return {"tls_ca": str(files.ca), "tls_cert": str(files.cert), "tls_key": str(files.key)}

    def redis_for(self, user: str) -> str:
        """The Redis URL of ``user`` (``cache`` or ``scheduler``)."""
        if self.lockdown is None:
            return self.redis_url
        address = self.redis_url.removeprefix("redis://").partition("/")[0]
        return self.lockdown.redis_url(user, address)

    async def start_cache(self) -> CacheService:
        settings = CacheSettings(
            redis_url=self.redis_for("cache"), **self.tls(Identity(Role.CACHE))
        )
        self.cache = CacheService(settings, CollectorRegistry())
        await self.cache.start()
        return self.cache

    async def start_node(self, node_id: str = "", **overrides: Any) -> NodeService:
        settings = NodeSettings(
            etcd_endpoint=self.etcd,
            node_id=node_id,
            models=[*self.generators, *self.embedders],
            registry_ttl_seconds=2,
            drain_grace_seconds=5,
            **{**self.tls(node_identity(node_id)), **overrides},
        )
        node = NodeService(settings, CollectorRegistry(), self.generators, self.embedders)
        await node.start()
        self.nodes.append(node)
        return node

    async def start_scheduler(self, **overrides: Any) -> SchedulerService:
        settings = SchedulerSettings(
            etcd_endpoint=self.etcd,
            cache_address=self.cache.address if self.cache else "",
            registry_ttl_seconds=2,
            **{**self.tls(Identity(Role.SCHEDULER)), **overrides},
        )
        self.scheduler = SchedulerService(settings, CollectorRegistry(), tenants=test_tenants())
        await self.scheduler.start()
        return self.scheduler

    def channel(
        self,
        address: str,
        peer: Identity | None = None,
        caller: Identity = Identity(Role.CLIENT),  # noqa: B008 - frozen
    ) -> grpc.aio.Channel:
        """A channel to ``peer`` at ``address``, holding ``caller``'s certificate when the
        suite is secure."""
        mesh = Mesh(self.lockdown.files(caller)) if self.lockdown else Mesh()
        channel = mesh.channel(address, peer)
        self.channels.append(channel)
        return channel

    def inference(self) -> inference_pb2_grpc.InferenceStub:
        assert self.scheduler is not None
        return inference_pb2_grpc.InferenceStub(
            self.channel(self.scheduler.address, Identity(Role.SCHEDULER))
        )

    def admin(self) -> admin_pb2_grpc.AdminStub:
        assert self.scheduler is not None
        return admin_pb2_grpc.AdminStub(
            self.channel(self.scheduler.address, Identity(Role.SCHEDULER))
        )

    def jobs(self) -> jobs_pb2_grpc.JobsStub:
        assert self.scheduler is not None
        return jobs_pb2_grpc.JobsStub(
            self.channel(self.scheduler.address, Identity(Role.SCHEDULER))
        )

    def cache_stub(self) -> cache_pb2_grpc.CacheStub:
        """The cache, called as the scheduler would."""
        assert self.cache is not None
        return cache_pb2_grpc.CacheStub(
            self.channel(self.cache.address, Identity(Role.CACHE), Identity(Role.SCHEDULER))
        )

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        if self.scheduler is not None:
            await self.scheduler.stop(0.5)
        for node in self.nodes:
            if not node.drained.is_set() or node.server.port:
                with contextlib.suppress(Exception):  # already crashed on purpose
                    await node.stop(0.5)
        if self.cache is not None:
            await self.cache.stop(0.5)


def auth(key: str = API_KEY) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying an API key."""
    return (("authorization", f"Bearer {key}"),)


@contextlib.asynccontextmanager
async def fake_node(
    etcd_endpoint: str, servicer: node_pb2_grpc.NodeServicer, node_id: str
) -> AsyncIterator[None]:
    """Serve ``servicer`` as a registered, SERVING node offering the tiny model: a real gRPC
    server with a health service, registered in etcd on a lease (faults scripted by tests)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    node_pb2_grpc.add_NodeServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    info = common_pb2.NodeInfo(
        node_id=node_id,
        address=f"127.0.0.1:{port}",
        models=[
            common_pb2.ModelInfo(name="tiny-random-llama", kind=common_pb2.MODEL_KIND_GENERATE)
        ],
        pools=["realtime"],
        capacity=common_pb2.Capacity(max_sequences=8),
        state=common_pb2.NODE_STATE_SERVING,
    )
    etcd = etcd_client(etcd_endpoint)
    registration = Registration(etcd, NODES_PREFIX + node_id, info.SerializeToString(), 2)
    await registration.start()
    try:
        yield
    finally:
        await registration.stop()
        await server.stop(0)
        await etcd.close()
