"""`sluice demo` (and `make demo`): the suite on this machine, a few real requests, shut down.

Shows a streamed SmolLM2 answer through the scheduler, an embedding, a cache hit, the health
of every service, a few `sluice_` metrics from each `/metrics`, and the nodes in etcd.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from sluice import AsyncClient, TlsConfig
from sluice.contract import NODES_PREFIX
from sluice.local.up import Endpoints, Supervisor, UpConfig
from sluice.runtime.registry import etcd_client
from sluice.runtime.tls import Identity, Mesh, Role, node_identity
from sluice.v1 import common_pb2

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
QUESTION = "What is the capital of France? Answer in one short sentence."


def _tls(ep: Endpoints) -> TlsConfig | None:
    """The suite's CA and client certificate for the SDK; None when plaintext."""
    block = ep.tls
    if block is None:
        return None
    return TlsConfig(ca=block["ca"], cert=block.get("cert"), key=block.get("key"))


def _health(address: str, mesh: Mesh, peer: Identity) -> str:
    """``grpc.health.v1`` of any service, asked as the supervisor does (its certificate when
    the suite is secure; the service's certificate must name ``peer``)."""
    with mesh.sync_channel(address, peer) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _metrics_sample(address: str, limit: int = 3) -> list[str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}/metrics", timeout=5) as response:
        body = response.read().decode()
    return [
        line
        for line in body.splitlines()
        if line.startswith("sluice_") and "_created" not in line and not line.endswith(" 0.0")
    ][:limit]


async def _etcd_nodes(endpoint: str, mesh: Mesh) -> list[str]:
    """The node entries in etcd, read as the supervisor reads them (the suite's operator:
    the SDK's ``client`` certificate may read only ``/sluice/schedulers/``)."""
    client = etcd_client(endpoint, mesh=mesh)
    try:
        return [kv.key.decode() for kv in await client.get_prefix(NODES_PREFIX.encode())]
    finally:
        await client.close()


async def _requests(sup: Supervisor, console: Console) -> None:
    ep = sup.endpoints
    assert ep is not None
    client = AsyncClient(ep.scheduler["grpc"], api_key=sup.api_key, tls=_tls(ep) or False)
    async with client:
        console.print(Rule("1. streamed chat generation (SmolLM2-135M-Instruct, greedy)"))
        console.print(f"[bold]user:[/bold] {QUESTION}")
        console.print("[bold]assistant:[/bold] ", end="")
        started = time.perf_counter()
        ttft = 0.0
        last = None
        chunks = 0
        async for chunk in client.generate(CHAT_MODEL, [("user", QUESTION)], max_new_tokens=48):
            if chunks == 0:
                ttft = time.perf_counter() - started
            chunks += 1
            console.print(chunk.text, end="", highlight=False, soft_wrap=True)
            last = chunk
        elapsed = time.perf_counter() - started
        assert last is not None
        console.print()
        tokens = last.usage.completion_tokens
        console.print(
            f"[dim]→ scheduler {ep.scheduler['grpc']} → {last.node_id}; {chunks} chunks, "
            f"{tokens} tokens, first token after {ttft * 1000:.0f} ms, "
            f"{tokens / elapsed:.1f} tokens/s, finish "
            f"{common_pb2.FinishReason.Name(last.finish_reason)}[/dim]"
        )

        console.print(Rule("2. embeddings (all-MiniLM-L6-v2)"))
        texts = [
            "The cat sits on the mat.",
            "A kitten rests on a rug.",
            "Stock markets fell today.",
        ]
        reply = await client.embed(EMBED_MODEL, texts)
        vectors = [list(e.values) for e in reply.embeddings]

        def cos(a: list[float], b: list[float]) -> float:
            return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
                sum(x * x for x in a) * sum(y * y for y in b)
            )

        for text, vec in zip(texts, vectors, strict=True):
            console.print(f"{text!r}: [{', '.join(f'{v:+.3f}' for v in vec[:4])}, …]")
        console.print(
            f"[dim]→ {reply.node_id}; {reply.dimensions} dims; cosine(cat, kitten) = "
            f"{cos(vectors[0], vectors[1]):.3f}, cosine(cat, markets) = "
            f"{cos(vectors[0], vectors[2]):.3f}[/dim]"
        )

        console.print(Rule("3. the same question again: a cache hit"))
        await asyncio.sleep(0.3)  # the scheduler stores the first answer in the background
        started = time.perf_counter()
        cached = [
            c async for c in client.generate(CHAT_MODEL, [("user", QUESTION)], max_new_tokens=48)
        ]
        elapsed = time.perf_counter() - started
        hit = cached[-1]
        console.print(f"[bold]assistant:[/bold] {''.join(c.text for c in cached)}")
        console.print(
            f"[dim]→ served from the cache (Redis {ep.redis}): cached={hit.cached}, "
            f"{elapsed * 1000:.1f} ms, originally generated on {hit.node_id}[/dim]"
        )
        if not hit.cached:
            raise RuntimeError("expected a cache hit on the repeated request")

        nodes = await client.list_nodes()
        console.print(Rule("4. the fleet"))
        for n in nodes:
            console.print(
                f"{n.info.node_id} at {n.info.address}: healthy={n.healthy}, "
                f"models={[m.name for m in n.info.models]}, pools={list(n.info.pools)}"
            )
        keys = await _etcd_nodes(ep.etcd, sup.mesh)
        console.print(f"etcd {ep.etcd} {NODES_PREFIX}: {keys}")


def print_endpoints(sup: Supervisor, console: Console) -> None:
    """A table of every endpoint of a running suite."""
    ep = sup.endpoints
    assert ep is not None
    table = Table(title="Sluice is up")
    table.add_column("service")
    table.add_column("gRPC")
    table.add_column("metrics")
    table.add_row("scheduler", ep.scheduler["grpc"], f"http://{ep.scheduler['metrics']}/metrics")
    table.add_row("cache", ep.cache["grpc"], f"http://{ep.cache['metrics']}/metrics")
    for node in ep.nodes:
        table.add_row(node["id"], node["grpc"], f"http://{node['metrics']}/metrics")
    table.add_row("etcd", ep.etcd, "")
    table.add_row("redis", ep.redis, "")
    console.print(table)
    console.print(f"logs: {ep.logs}   endpoints: {sup.run_dir / 'endpoints.json'}")
    tls = ep.tls
    if tls is None:
        console.print("[yellow]plaintext: no TLS, internal calls unauthenticated")
    else:
        console.print(f"TLS: clients trust the CA {tls['ca']}")
    if sup.api_key:
        console.print(f"development tenant 'dev', API key: [bold]{sup.api_key}[/bold]")


def run_demo(run_dir: Path, nodes: int, console: Console) -> int:
    """Run the demo; returns the exit code."""
    sup = Supervisor(
        UpConfig(run_dir=run_dir, nodes=nodes), say=lambda m: console.print(f"[dim]{m}[/dim]")
    )
    console.print(Rule("starting the suite (first run converts SmolLM2 once, ~20 s)"))
    try:
        sup.start()
        print_endpoints(sup, console)
        asyncio.run(_requests(sup, console))
        ep = sup.endpoints
        assert ep is not None
        console.print(Rule("5. health and metrics of every service"))
        services = [
            ("scheduler", ep.scheduler, Identity(Role.SCHEDULER)),
            ("cache", ep.cache, Identity(Role.CACHE)),
            *((n["id"], n, node_identity(n["id"])) for n in ep.nodes),
        ]
        for name, addresses, peer in services:
            health = _health(addresses["grpc"], sup.mesh, peer)
            console.print(f"{name}: grpc.health.v1 Check → {health}")
            for line in _metrics_sample(addresses["metrics"]):
                console.print(f"   [dim]{line}[/dim]")
        console.print(Rule("demo finished: shutting down"))
        return 0
    except Exception as exc:
        console.print(f"[red]demo failed: {exc!r}[/red]")
        console.print(f"logs are in {sup.logs}")
        return 1
    finally:
        sup.stop()
