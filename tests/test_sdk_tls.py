"""The SDK and the CLI over TLS: the scheduler's public port serves TLS (no client
certificates), etcd discovery is mutual TLS, and every failure to agree on a certificate is a
prompt ``UnavailableError`` carrying the handshake's message.

Servers are the shared ``GrpcServer`` with ``ServerOptions(tls=...)`` on free ports, holding
certificates from ``sluice.local.pki`` (as `sluice up` makes them); a tiny ``Inference``
servicer stands in for the scheduler and a ``KV`` servicer holding scheduler entries for etcd.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from aetcd.rpc import kv_pb2, rpc_pb2, rpc_pb2_grpc
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner, Result

import sluice
import sluice.sdk
from sluice import AsyncClient, Client, RetryPolicy, TlsConfig, UnavailableError, cli
from sluice.contract import SCHEDULERS_PREFIX
from sluice.local.pki import Pki, create_pki
from sluice.local.rundir import ENDPOINTS_FILE, suite_tls
from sluice.runtime.server import GrpcServer, ServerOptions
from sluice.runtime.tls import Identity, Role, ServerTls
from sluice.sdk import tls as sdk_tls
from sluice.sdk.tls import CA_ENV, CERT_ENV, KEY_ENV, resolve_tls
from sluice.v1 import common_pb2, inference_pb2, inference_pb2_grpc

SCHEDULER = Identity(Role.SCHEDULER)
CLIENT = Identity(Role.CLIENT)
ETCD = Identity(Role.ETCD)
ENVS = (
    CA_ENV,
    CERT_ENV,
    KEY_ENV,
    "SLUICE_ENDPOINTS",
    "SLUICE_ETCD_ENDPOINTS",
    "SLUICE_ETCD_ENDPOINT",
    "SLUICE_API_KEY",
)
FAILS_FAST_S = 1.5
"""Well under the default retry policy's backoffs (0.2 + 0.4 + 0.8 + 1.6 s, ± 20 %)."""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No endpoint, key or TLS setting leaks in from the environment."""
    for env in ENVS:
        monkeypatch.delenv(env, raising=False)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """The suite's CA with a scheduler, an etcd and a client certificate."""
    return create_pki(tmp_path / "pki", [SCHEDULER, ETCD, CLIENT])


@pytest.fixture
def stranger(tmp_path: Path) -> Pki:
    """Another suite's CA, which signed none of ``pki``'s certificates."""
    return create_pki(tmp_path / "stranger", [SCHEDULER, CLIENT])


class Hello(inference_pb2_grpc.InferenceServicer):  # type: ignore[misc]
    """Answers every generation with one chunk naming the server."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def Generate(
        self, request: inference_pb2.GenerateRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        yield inference_pb2.GenerateChunk(
            text=f"hello from {self.name}",
            node_id=self.name,
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
        )


class SchedulerEntries(rpc_pb2_grpc.KVServicer):  # type: ignore[misc]
    """etcd's ``KV.Range`` as discovery reads it: one ``SchedulerInfo`` per address."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def Range(
        self, request: rpc_pb2.RangeRequest, ctx: grpc.aio.ServicerContext
    ) -> rpc_pb2.RangeResponse:
        kvs = [
            kv_pb2.KeyValue(
                key=f"{SCHEDULERS_PREFIX}replica-{i}".encode(),
                value=common_pb2.SchedulerInfo(address=address).SerializeToString(),
            )
            for i, address in enumerate(self.addresses)
        ]
        return rpc_pb2.RangeResponse(kvs=kvs, count=len(kvs))


Serve = Callable[..., Awaitable[GrpcServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts servers on free ports: ``await serve(tls, name)`` a scheduler stand-in,
    ``await serve(tls, etcd=[addresses])`` an etcd stand-in; stops them after the test."""
    servers: list[GrpcServer] = []

    async def start(
        tls: ServerTls | None, name: str = "a", *, etcd: list[str] | None = None
    ) -> GrpcServer:
        server = GrpcServer(name, ServerOptions(grace_s=0.1, tls=tls), CollectorRegistry())
        if etcd is None:
            server.add(inference_pb2_grpc.add_InferenceServicer_to_server, Hello(name), "x.I")
        else:
            kv = SchedulerEntries(etcd)
            server.add(rpc_pb2_grpc.add_KVServicer_to_server, kv, "etcdserverpb.KV")
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(0.1)


def public_port(pki: Pki) -> ServerTls:
    """The scheduler's public port: TLS, no client certificate asked for."""
    return ServerTls(pki.files(SCHEDULER), require_client_auth=False)


def client_tls(pki: Pki) -> TlsConfig:
    """What `sluice up` hands its clients: the CA and the client certificate."""
    files = pki.files(CLIENT)
    return TlsConfig(ca=files.ca, cert=files.cert, key=files.key)


async def first_text(client: AsyncClient) -> str:
    return "".join([c.text async for c in client.generate("m", "hi")])


# -- configuration -------------------------------------------------------------------------


def test_the_environment_gives_tls_only_with_a_ca() -> None:
    """``SLUICE_TLS_CA`` turns TLS on (with the client certificate when given); without it the
    client is plaintext even when a certificate is named."""
    assert TlsConfig.from_env({}) is None
    assert TlsConfig.from_env({CERT_ENV: "c.pem", KEY_ENV: "k.pem"}) is None
    assert TlsConfig.from_env({CA_ENV: "ca.pem"}) == TlsConfig(ca="ca.pem")
    env = {CA_ENV: "ca.pem", CERT_ENV: "c.pem", KEY_ENV: "k.pem"}
    assert TlsConfig.from_env(env) == TlsConfig(ca="ca.pem", cert="c.pem", key="k.pem")
    with pytest.raises(ValueError, match="cert and key go together"):
        TlsConfig.from_env({CA_ENV: "ca.pem", CERT_ENV: "c.pem"})


def test_the_tls_argument_none_reads_the_env_true_uses_system_roots_false_is_plaintext(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert resolve_tls(None) is None
    monkeypatch.setenv(CA_ENV, "ca.pem")
    assert resolve_tls(None) == TlsConfig(ca="ca.pem")
    assert resolve_tls(False) is None
    assert resolve_tls(True) == TlsConfig()
    given = TlsConfig(ca=b"-----BEGIN CERTIFICATE-----", server_name="scheduler.sluice")
    assert resolve_tls(given) is given


def test_an_unreadable_or_non_pem_file_fails_the_client_at_once(tmp_path: Path) -> None:
    """A bad file is a ``ValueError`` naming the field when the client is made, not a
    handshake failure on the first call."""
    with pytest.raises(ValueError, match=r"TLS ca: cannot read .*missing\.pem"):
        Client("127.0.0.1:1", tls=TlsConfig(ca=tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"TLS ca: .*junk\.pem is not PEM"):
        AsyncClient("127.0.0.1:1", tls=TlsConfig(ca=str(tmp_path / "junk.pem")))


def test_sluice_exports_tls_config_lazily() -> None:
    assert sluice.TlsConfig is sdk_tls.TlsConfig
    assert sluice.sdk.TlsConfig is sdk_tls.TlsConfig
    assert "TlsConfig" in sluice.__all__


# -- scheduler calls -----------------------------------------------------------------------


async def test_async_client_calls_a_tls_scheduler_trusting_the_suites_ca(
    serve: Serve, pki: Pki
) -> None:
    """The CA as a path or as PEM bytes; a client certificate is accepted but not needed."""
    server = await serve(public_port(pki))
    for tls in (TlsConfig(ca=pki.ca), TlsConfig(ca=pki.ca.read_bytes()), client_tls(pki)):
        async with AsyncClient(server.address, tls=tls) as client:
            assert await first_text(client) == "hello from a"


async def test_sync_client_takes_the_ca_from_the_environment(
    serve: Serve, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await serve(public_port(pki))
    monkeypatch.setenv(CA_ENV, str(pki.ca))

    def use() -> str:
        with Client(server.address) as client:
            assert client.tls == TlsConfig(ca=str(pki.ca))
            return client.generate_text("m", "hi")

    assert await asyncio.to_thread(use) == "hello from a"


async def test_a_ca_that_did_not_sign_the_scheduler_fails_at_once_with_the_handshake_message(
    serve: Serve, pki: Pki, stranger: Pki
) -> None:
    """Waiting does not change a certificate: no retry on the same endpoint, default policy."""
    server = await serve(public_port(pki))
    async with AsyncClient(server.address, tls=TlsConfig(ca=stranger.ca)) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="handshake failed") as caught:
            await first_text(client)
    assert time.monotonic() - started < FAILS_FAST_S
    assert caught.value.attempts == 1

    def use() -> UnavailableError:
        with Client(server.address, tls=True) as client, pytest.raises(UnavailableError) as e:
            client.generate_text("m", "hi")  # system roots do not trust a local CA
        return e.value

    assert "CERTIFICATE_VERIFY_FAILED" in (await asyncio.to_thread(use)).message


async def test_the_certificate_must_carry_the_server_name(
    serve: Serve, pki: Pki, stranger: Pki
) -> None:
    """``server_name`` replaces the dialled host in verification: ``scheduler.sluice`` is in
    the scheduler's certificate, ``node.sluice`` is not."""
    server = await serve(public_port(pki))
    right = TlsConfig(ca=pki.ca, server_name="scheduler.sluice")
    async with AsyncClient(server.address, tls=right) as client:
        assert await first_text(client) == "hello from a"
    wrong = TlsConfig(ca=pki.ca, server_name="node.sluice")
    async with AsyncClient(server.address, tls=wrong) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="Hostname Verification"):
            await first_text(client)
    assert time.monotonic() - started < FAILS_FAST_S


async def test_a_plaintext_client_against_a_tls_port_fails_cleanly(
    serve: Serve, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tls=False`` wins over the environment; the server closes the connection."""
    server = await serve(public_port(pki))
    monkeypatch.setenv(CA_ENV, str(pki.ca))
    async with AsyncClient(server.address, tls=False, retry=None) as client:
        with pytest.raises(UnavailableError, match="Socket closed"):
            await first_text(client)


async def test_a_tls_client_against_a_plaintext_port_fails_at_once(serve: Serve, pki: Pki) -> None:
    server = await serve(None)
    async with AsyncClient(server.address, tls=TlsConfig(ca=pki.ca)) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="handshake failed"):
            await first_text(client)
    assert time.monotonic() - started < FAILS_FAST_S


async def test_health_checks_go_over_tls(serve: Serve, pki: Pki, stranger: Pki) -> None:
    a, b = await serve(public_port(pki), "a"), await serve(public_port(pki), "b")
    addresses = [a.address, b.address]
    async with AsyncClient(addresses, tls=TlsConfig(ca=pki.ca)) as client:
        assert await client.check_health() == dict.fromkeys(addresses, True)
    async with AsyncClient(addresses, tls=TlsConfig(ca=stranger.ca)) as client:
        assert await client.check_health() == dict.fromkeys(addresses, False)

    def sync_health() -> dict[str, bool | None]:
        with Client(addresses, tls=TlsConfig(ca=pki.ca)) as client:
            return client.check_health()

    assert await asyncio.to_thread(sync_health) == dict.fromkeys(addresses, True)


async def test_a_scheduler_with_an_untrusted_certificate_is_passed_over(
    serve: Serve, pki: Pki, stranger: Pki
) -> None:
    """A handshake failure is a transport failure: the call goes on to the other endpoint."""
    impostor = await serve(public_port(stranger), "impostor")
    good = await serve(public_port(pki), "good")
    fast = RetryPolicy(initial_backoff_s=0.01)
    tls = TlsConfig(ca=pki.ca)
    async with AsyncClient(
        [impostor.address, good.address], tls=tls, retry=fast, health_check_interval_s=None
    ) as client:
        assert [await first_text(client) for _ in range(3)] == ["hello from good"] * 3


# -- discovery through etcd ----------------------------------------------------------------


async def test_schedulers_are_discovered_through_mutual_tls_etcd(serve: Serve, pki: Pki) -> None:
    """etcd requires a client certificate; the client shows the suite's and then calls the
    scheduler it found over TLS. A real TLS etcd is not started here (``etcd_process`` starts
    plaintext etcd only); a ``KV`` servicer on a mutual-TLS port stands in for it."""
    scheduler = await serve(public_port(pki))
    etcd_files = pki.files(ETCD)
    etcd = await serve(ServerTls(etcd_files, require_client_auth=True), etcd=[scheduler.address])

    async with AsyncClient(etcd_endpoints=etcd.address, tls=client_tls(pki)) as client:
        assert client.endpoints == [scheduler.address]
        assert await first_text(client) == "hello from a"

    def sync_discovery() -> tuple[list[str], str]:
        with Client(etcd_endpoints=etcd.address, tls=client_tls(pki)) as client:
            return client.endpoints, client.generate_text("m", "hi")

    assert await asyncio.to_thread(sync_discovery) == ([scheduler.address], "hello from a")


async def test_discovery_without_a_client_certificate_is_unavailable(
    serve: Serve, pki: Pki
) -> None:
    etcd_files = pki.files(ETCD)
    etcd = await serve(ServerTls(etcd_files, require_client_auth=True), etcd=["127.0.0.1:1"])
    client = AsyncClient(etcd_endpoints=etcd.address, tls=TlsConfig(ca=pki.ca))
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="no etcd endpoint answered"):
        await client.connect()
    assert time.monotonic() - started < FAILS_FAST_S
    await client.close()


# -- the CLI -------------------------------------------------------------------------------


def write_run_dir(
    run_dir: Path, scheduler: str, tls: dict[str, str] | None, etcd: str = "127.0.0.1:2379"
) -> Path:
    """An ``endpoints.json`` as a running `sluice up` writes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    endpoints = {"scheduler": {"grpc": scheduler, "metrics": ""}, "etcd": etcd, "tls": tls}
    (run_dir / ENDPOINTS_FILE).write_text(json.dumps(endpoints))
    return run_dir


def up_tls(pki: Pki) -> dict[str, str]:
    files = pki.files(CLIENT)
    return {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}


async def invoke(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli.app, list(args))


def test_the_run_dirs_tls_is_for_that_suites_addresses_only(tmp_path: Path, pki: Pki) -> None:
    run_dir = write_run_dir(tmp_path / "run", "127.0.0.1:5000", up_tls(pki))
    assert suite_tls(run_dir, []) == up_tls(pki)
    assert suite_tls(run_dir, ["127.0.0.1:5000"]) == up_tls(pki)
    assert suite_tls(run_dir, ["127.0.0.1:2379"]) == up_tls(pki)
    assert suite_tls(run_dir, ["127.0.0.1:5000", "10.0.0.9:5000"]) is None
    assert suite_tls(write_run_dir(tmp_path / "plain", "127.0.0.1:5000", None), []) is None
    assert suite_tls(tmp_path / "nothing", []) is None


async def test_cli_commands_take_tls_from_the_run_directory(
    serve: Serve, pki: Pki, tmp_path: Path
) -> None:
    server = await serve(public_port(pki))
    run_dir = write_run_dir(tmp_path / "run", server.address, up_tls(pki))
    result = await invoke("generate", "hi", "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "hello from a" in result.output


async def test_cli_insecure_forces_plaintext_and_says_why_it_failed(
    serve: Serve, pki: Pki, tmp_path: Path
) -> None:
    server = await serve(public_port(pki))
    run_dir = write_run_dir(tmp_path / "run", server.address, up_tls(pki))
    result = await invoke("generate", "hi", "--run-dir", str(run_dir), "--insecure")
    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.output
    assert "as a TLS server does to a plaintext client" in result.output
    both = await invoke(
        "generate", "hi", "--endpoint", server.address, "--insecure", "--ca", str(pki.ca)
    )
    assert both.exit_code == 2
    assert "--insecure goes with none of" in both.output


async def test_cli_run_dir_without_tls_is_plaintext(serve: Serve, tmp_path: Path) -> None:
    server = await serve(None)
    run_dir = write_run_dir(tmp_path / "run", server.address, None)
    result = await invoke("generate", "hi", "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "hello from a" in result.output


async def test_cli_flags_override_the_run_directory(
    serve: Serve, pki: Pki, stranger: Pki, tmp_path: Path
) -> None:
    """``--ca`` replaces the run directory's CA; with ``--endpoint`` of another suite the run
    directory's TLS is not used at all."""
    server = await serve(public_port(pki))
    run_dir = write_run_dir(tmp_path / "run", server.address, up_tls(pki))
    wrong = await invoke("generate", "hi", "--run-dir", str(run_dir), "--ca", str(stranger.ca))
    assert wrong.exit_code == 1
    assert "handshake failed" in wrong.output
    elsewhere = tmp_path / "elsewhere"
    result = await invoke(
        "generate", "hi", "--endpoint", server.address, "--run-dir", str(elsewhere)
    )
    assert result.exit_code == 1  # no CA known for this address: plaintext
    result = await invoke(
        "generate", "hi", "--endpoint", server.address, "--ca", str(pki.ca), "--run-dir", "x"
    )
    assert result.exit_code == 0, result.output
    assert "hello from a" in result.output


async def test_cli_discovers_through_the_run_dirs_etcd_with_its_client_certificate(
    serve: Serve, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SLUICE_ETCD_ENDPOINTS`` naming the local suite's etcd: the run directory's client
    certificate is shown to it. With only a CA in the environment etcd refuses, and the CLI
    says a certificate may be wanted."""
    scheduler = await serve(public_port(pki))
    etcd = await serve(ServerTls(pki.files(ETCD)), etcd=[scheduler.address])
    run_dir = write_run_dir(tmp_path / "run", scheduler.address, up_tls(pki), etcd.address)
    monkeypatch.setenv("SLUICE_ETCD_ENDPOINTS", etcd.address)
    result = await invoke("generate", "hi", "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "hello from a" in result.output
    monkeypatch.setenv(CA_ENV, str(pki.ca))
    refused = await invoke("generate", "hi", "--run-dir", str(run_dir))
    assert refused.exit_code == 1
    assert "no etcd endpoint answered" in refused.output
    assert "without a certificate (--cert and --key)" in refused.output


async def test_cli_a_tls_file_that_cannot_work_exits_2(tmp_path: Path) -> None:
    result = await invoke(
        "generate", "hi", "--endpoint", "127.0.0.1:1", "--ca", str(tmp_path / "none.pem")
    )
    assert result.exit_code == 2
    assert "TLS ca: cannot read" in result.output
