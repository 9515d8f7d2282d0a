"""The mutual-TLS mesh: who may call what, with real certificates, etcd auth and Redis users.

Every refusal is tried the way an intruder on the network would: plaintext, TLS without a
certificate, a certificate from another CA, and a valid certificate of the wrong identity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler.nodes import NodeDirectory
from sluice.local.lockdown import Lockdown
from sluice.local.pki import create_pki
from sluice.local.stores import StoreProcess
from sluice.runtime.registry import etcd_client
from sluice.runtime.tls import CallerCheck, Identity, Mesh, Role, TlsFiles, node_identity
from sluice.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from tests.harness import API_KEY, Suite, auth, eventually

MODEL = "tiny-random-llama"
NODE_REQUEST = node_pb2.NodeGenerateRequest(
    request_id="mesh-test",
    tenant="alpha",
    request=inference_pb2.GenerateRequest(
        model=MODEL, prompt="hi", options=common_pb2.GenerationOptions(max_new_tokens=2)
    ),
)


def test_identity_round_trips_through_its_spiffe_id() -> None:
    """An identity is read back from its SPIFFE id; ids of another trust domain or an unknown
    role name no identity."""
    for identity in (Identity(Role.SCHEDULER), node_identity("node-7"), Identity(Role.CACHE)):
        assert Identity.from_spiffe_id(identity.spiffe_id) == identity
    assert Identity.from_spiffe_id("spiffe://other/scheduler") is None
    assert Identity.from_spiffe_id("spiffe://sluice/wizard") is None
    assert node_identity("node-7").server_name == "node-7.node.sluice"
    assert node_identity("node-7").common_name == "node.node-7"


class _Ctx:
    def __init__(self, spiffe_id: str | None) -> None:
        self._auth = {"peer_spiffe_id": [spiffe_id.encode()]} if spiffe_id else {}

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def test_caller_check_admits_only_the_named_roles() -> None:
    """Node methods: schedulers only; a node, a client or a peer without a certificate is
    refused PERMISSION_DENIED naming who it was; other services stay open (health)."""
    check = CallerCheck({"sluice.v1.Node": [Role.SCHEDULER]})
    method = "/sluice.v1.Node/Generate"
    assert check.check(method, _Ctx(Identity(Role.SCHEDULER).spiffe_id)) is None  # type: ignore[arg-type]
    for who in (node_identity("n1").spiffe_id, Identity(Role.CLIENT).spiffe_id, None):
        denied = check.check(method, _Ctx(who))  # type: ignore[arg-type]
        assert denied is not None
        assert denied.code == grpc.StatusCode.PERMISSION_DENIED
        assert denied.reason == "CALLER_NOT_ALLOWED"
    assert check.check("/grpc.health.v1.Health/Check", _Ctx(None)) is None  # type: ignore[arg-type]


async def _code(call: Callable[[], Awaitable[Any]]) -> grpc.StatusCode:
    try:
        await call()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _foreign_files(tmp: Path) -> TlsFiles:
    """A scheduler certificate from a CA nobody trusts."""
    return create_pki(tmp / "foreign", [Identity(Role.SCHEDULER)]).files(Identity(Role.SCHEDULER))


async def _node_call(address: str, channel: grpc.aio.Channel) -> grpc.StatusCode:
    async with channel:
        stub = node_pb2_grpc.NodeStub(channel)

        async def call() -> None:
            async for _ in stub.Generate(NODE_REQUEST, timeout=5):
                pass

        return await _code(call)


async def test_secure_suite_serves_end_to_end_over_mutual_tls(secure_suite: Suite) -> None:
    """Scheduler, node and cache on mutual TLS, etcd and Redis with users: a Generate streams,
    the second identical one is served from the cache, an Embed answers."""
    await secure_suite.start_cache()
    await secure_suite.start_node("node-a")
    scheduler = await secure_suite.start_scheduler()
    await eventually(lambda: scheduler.nodes.candidates(MODEL, 1))
    stub = secure_suite.inference()
    request = inference_pb2.GenerateRequest(
        model=MODEL, prompt="mesh end to end", options=common_pb2.GenerationOptions(seed=3)
    )
    first = [c async for c in stub.Generate(request, metadata=auth(), timeout=30)]
    assert first and first[-1].finish_reason
    assert secure_suite.cache is not None

    async def cached() -> bool:
        chunks = [c async for c in stub.Generate(request, metadata=auth(), timeout=30)]
        return any(c.cached for c in chunks)

    for _ in range(50):
        if await cached():
            break
    else:
        pytest.fail("the second identical request was never served from the cache")
    embed = await stub.Embed(
        inference_pb2.EmbedRequest(model="all-minilm-l6-v2", inputs=["x"]),
        metadata=auth(),
        timeout=30,
    )
    assert len(embed.embeddings) == 1


async def test_node_accepts_only_a_scheduler_certificate(
    secure_suite: Suite, tmp_path: Path
) -> None:
    """Node/Generate from plaintext, TLS without a certificate or a foreign CA's certificate
    fails the handshake (UNAVAILABLE); a valid client or node certificate is refused
    PERMISSION_DENIED; the scheduler's certificate gets an answer; health is open to any
    certificate of the suite."""
    lockdown = secure_suite.lockdown
    assert lockdown is not None
    node = await secure_suite.start_node("node-a")
    address, peer = node.address, node_identity("node-a")
    ca = lockdown.files(Identity(Role.CLIENT)).ca.read_bytes()
    attempts = {
        "plaintext": grpc.aio.insecure_channel(address),
        "no certificate": grpc.aio.secure_channel(
            address,
            grpc.ssl_channel_credentials(ca),
            options=Mesh(lockdown.files(Identity(Role.CLIENT))).channel_options(peer),
        ),
        "foreign CA": Mesh(_foreign_files(tmp_path)).channel(address, peer),
    }
    for what, channel in attempts.items():
        assert await _node_call(address, channel) == grpc.StatusCode.UNAVAILABLE, what
    for caller in (Identity(Role.CLIENT), node_identity("node-b"), Identity(Role.CACHE)):
        channel = Mesh(lockdown.files(caller)).channel(address, peer)
        assert await _node_call(address, channel) == grpc.StatusCode.PERMISSION_DENIED, caller
    scheduler = Mesh(lockdown.files(Identity(Role.SCHEDULER))).channel(address, peer)
    assert await _node_call(address, scheduler) == grpc.StatusCode.OK
    async with Mesh(lockdown.files(Identity(Role.CLIENT))).channel(address, peer) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_cache_accepts_only_a_scheduler_certificate(secure_suite: Suite) -> None:
    """A node's certificate cannot read or write the cache (PERMISSION_DENIED), nor can a
    caller without a certificate (UNAVAILABLE); the scheduler's can."""
    lockdown = secure_suite.lockdown
    assert lockdown is not None
    cache = await secure_suite.start_cache()
    peer = Identity(Role.CACHE)
    lookup = cache_pb2.LookupRequest(tenant="alpha", request=NODE_REQUEST.request)
    store = cache_pb2.StoreRequest(
        tenant="alpha",
        request=NODE_REQUEST.request,
        response=cache_pb2.CachedResponse(text="forged"),
        ttl_seconds=60,
    )
    expected = {
        node_identity("node-a"): grpc.StatusCode.PERMISSION_DENIED,
        Identity(Role.CLIENT): grpc.StatusCode.PERMISSION_DENIED,
        Identity(Role.SCHEDULER): grpc.StatusCode.OK,
    }
    for caller, code in expected.items():
        async with Mesh(lockdown.files(caller)).channel(cache.address, peer) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            assert await _code(lambda s=stub: s.Lookup(lookup, timeout=5)) == code, caller
            assert await _code(lambda s=stub: s.Store(store, timeout=5)) == code, caller
    async with grpc.aio.insecure_channel(cache.address) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        assert await _code(lambda: stub.Lookup(lookup, timeout=5)) == grpc.StatusCode.UNAVAILABLE


async def test_scheduler_never_routes_to_a_node_whose_certificate_names_another_id(
    secure_suite: Suite,
) -> None:
    """An entry for node-b pointing at node-a's port (written by someone able to write etcd)
    never becomes a candidate: the handshake checks that the certificate names node-b. The
    genuine node-a stays a candidate."""
    lockdown = secure_suite.lockdown
    assert lockdown is not None
    node = await secure_suite.start_node("node-a")
    scheduler = await secure_suite.start_scheduler()
    await eventually(lambda: scheduler.nodes.candidates(MODEL, 1))
    root = etcd_client(secure_suite.etcd, mesh=Mesh(lockdown.files(Identity(Role.ROOT))))
    forged = common_pb2.NodeInfo()
    forged.ParseFromString((await root.get(b"/sluice/nodes/node-a")).value)
    assert forged.address == node.address
    forged.node_id = "node-b"
    await root.put(b"/sluice/nodes/node-b", forged.SerializeToString())
    await root.close()
    await eventually(lambda: scheduler.nodes.get("node-b") is not None)
    directory: NodeDirectory = scheduler.nodes
    for _ in range(20):
        ids = {n.node_id for n in directory.candidates(MODEL, 1)}
        assert ids == {"node-a"}
        await asyncio.sleep(0.05)
    handle = directory.get("node-b")
    assert handle is not None and not handle.healthy


async def test_etcd_refuses_strangers_and_keeps_each_identity_to_its_keys(
    locked_stores: tuple[Lockdown, StoreProcess, StoreProcess],
) -> None:
    """Plaintext etcd calls fail; node-a may write its own entry and not node-b's nor the
    tenants document; the SDK's client certificate reads schedulers and nothing else."""
    lockdown, etcd, _ = locked_stores
    plain = etcd_client(etcd.address, timeout_s=2)
    with pytest.raises(Exception):  # noqa: B017 - aetcd wraps the transport error
        await plain.get(b"/sluice/nodes/node-a")
    await plain.close()
    node_a = etcd_client(etcd.address, mesh=Mesh(lockdown.files(node_identity("node-a"))))
    await node_a.put(b"/sluice/nodes/node-a", b"entry")
    for key in (b"/sluice/nodes/node-b", b"/sluice/config/tenants", b"/sluice/schedulers/x"):
        with pytest.raises(Exception, match="permission denied"):
            await node_a.put(key, b"forged")
    await node_a.delete(b"/sluice/nodes/node-a")
    await node_a.close()
    client = etcd_client(etcd.address, mesh=Mesh(lockdown.files(Identity(Role.CLIENT))))
    await client.get(b"/sluice/schedulers/x")
    with pytest.raises(Exception, match="permission denied"):
        await client.get(b"/sluice/config/tenants")
    with pytest.raises(Exception, match="permission denied"):
        await client.put(b"/sluice/schedulers/x", b"forged")
    await client.close()


async def test_redis_wants_a_user_and_keeps_each_to_its_keys(
    locked_stores: tuple[Lockdown, StoreProcess, StoreProcess],
) -> None:
    """Without credentials Redis answers nothing; the cache user cannot touch quota keys nor
    run administrative commands; the scheduler user cannot read cached answers."""
    lockdown, _, redis_store = locked_stores
    anonymous = redis.Redis.from_url(f"redis://{redis_store.address}/0")
    with pytest.raises(redis.AuthenticationError):
        await anonymous.get("sluice:cache:v1:x")
    await anonymous.aclose()
    cache = redis.Redis.from_url(lockdown.redis_url("cache", redis_store.address))
    await cache.set("sluice:cache:v1:mesh", "1")
    with pytest.raises(redis.ResponseError, match="permission"):
        await cache.set("sluice:quota:v1:x", "1")
    with pytest.raises(redis.ResponseError, match="permission"):
        await cache.flushall()
    await cache.aclose()
    scheduler = redis.Redis.from_url(lockdown.redis_url("scheduler", redis_store.address))
    with pytest.raises(redis.ResponseError, match="permission"):
        await scheduler.get("sluice:cache:v1:mesh")
    await scheduler.aclose()


async def test_public_port_refuses_plaintext_and_serves_tls_with_an_api_key(
    secure_suite: Suite,
) -> None:
    """The scheduler's public port is TLS: a plaintext client fails, a TLS client with the CA
    and no certificate of its own is served with its API key."""
    await secure_suite.start_node("node-a")
    scheduler = await secure_suite.start_scheduler()
    await eventually(lambda: scheduler.nodes.candidates(MODEL, 1))
    request = inference_pb2.EmbedRequest(model="all-minilm-l6-v2", inputs=["tls"])
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        code = await _code(lambda: stub.Embed(request, metadata=auth(API_KEY), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
    lockdown = secure_suite.lockdown
    assert lockdown is not None
    ca = lockdown.files(Identity(Role.CLIENT)).ca.read_bytes()
    async with grpc.aio.secure_channel(scheduler.address, grpc.ssl_channel_credentials(ca)) as ch:
        reply = await inference_pb2_grpc.InferenceStub(ch).Embed(
            request, metadata=auth(API_KEY), timeout=30
        )
        assert len(reply.embeddings) == 1


def test_instance_names_are_lower_case_dns_labels() -> None:
    """A node id that could match another node's certificate (a wildcard, other case) or
    escape the PKI directory is refused."""
    for bad in ("*", "Node-1", "../x", "a.b", "-a", "a" * 64):
        with pytest.raises(ValueError, match="instance name"):
            node_identity(bad)
    assert node_identity("node-1").name == "node-1"


def test_only_services_reached_by_address_name_hosts(tmp_path: Path) -> None:
    """The scheduler's and etcd's certificates name the hosts; a node's names only its service
    name; client and root certificates are for client use only (none passes as a server at an
    address); a host added later gets the scheduler a new certificate."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: PLC0415

    def sans(pki_dir: Path, identity: Identity) -> set[str]:
        cert = x509.load_pem_x509_certificate(TlsFiles.of(pki_dir, identity).cert.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(v) for v in names.get_values_for_type(x509.DNSName)} | {
            str(v) for v in names.get_values_for_type(x509.IPAddress)
        }

    ids = [Identity(Role.SCHEDULER), node_identity("node-1"), Identity(Role.CLIENT)]
    pki = create_pki(tmp_path, ids, hosts=["127.0.0.1", "0.0.0.0"])
    assert {"127.0.0.1", "localhost", "scheduler.sluice"} <= sans(tmp_path, ids[0])
    assert "0.0.0.0" not in sans(tmp_path, ids[0])
    assert sans(tmp_path, ids[1]) == {"node-1.node.sluice"}
    client = x509.load_pem_x509_certificate(pki.files(ids[2]).cert.read_bytes())
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    create_pki(tmp_path, ids, hosts=["127.0.0.1", "10.1.2.3"])
    assert "10.1.2.3" in sans(tmp_path, ids[0])


def test_children_do_not_inherit_the_operators_sluice_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CLI user's SLUICE_TLS_* or SLUICE_REDIS_URL never reaches a service `sluice up`
    starts; the process-level choices the README documents do."""
    from sluice.local.stores import environment_without_proxies  # noqa: PLC0415

    monkeypatch.setenv("SLUICE_TLS_CA", "/elsewhere/ca.pem")
    monkeypatch.setenv("SLUICE_REDIS_URL", "redis://x")
    monkeypatch.setenv("SLUICE_EVENT_LOOP", "asyncio")
    env = environment_without_proxies()
    assert "SLUICE_TLS_CA" not in env and "SLUICE_REDIS_URL" not in env
    assert env["SLUICE_EVENT_LOOP"] == "asyncio"
