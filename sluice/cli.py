"""The `sluice` command line: run the suite locally and talk to it as a user would."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sluice.client import AsyncClient, SluiceRpcError
from sluice.demo import print_endpoints, run_demo
from sluice.up import Supervisor, UpConfig, dev_api_key, read_endpoints
from sluice.v1 import admin_pb2

app = typer.Typer(help="Sluice: keep a model-serving fleet answering under overload.")
console = Console()
err = Console(stderr=True)

RunDir = Annotated[Path, typer.Option("--run-dir", help="Run directory of `sluice up`.")]
Endpoint = Annotated[
    str | None, typer.Option("--endpoint", help="Scheduler host:port (else SLUICE_ENDPOINTS).")
]
ApiKey = Annotated[str | None, typer.Option("--api-key", help="API key (else SLUICE_API_KEY).")]
DEFAULT_RUN_DIR = Path(".sluice")


def _connect(endpoint: str | None, api_key: str | None, run_dir: Path) -> AsyncClient:
    """Client from flags, env, or the endpoints/dev key a local `sluice up` wrote."""
    if not endpoint and not os.environ.get("SLUICE_ENDPOINTS"):
        try:
            endpoint = read_endpoints(run_dir)["scheduler"]["grpc"]
        except FileNotFoundError:
            err.print(
                "[red]no scheduler: pass --endpoint, set SLUICE_ENDPOINTS, or run `sluice up`"
            )
            raise typer.Exit(2) from None
    if api_key is None and not os.environ.get("SLUICE_API_KEY"):
        api_key = dev_api_key(run_dir)
    return AsyncClient(endpoint, api_key=api_key)


def _call(coro: Coroutine[Any, Any, None]) -> None:
    """Run a CLI command's coroutine; an RPC error becomes a clear message and exit code 1."""
    try:
        asyncio.run(coro)
    except SluiceRpcError as exc:
        raise _fail(exc) from exc


def _fail(exc: SluiceRpcError) -> typer.Exit:
    err.print(f"[red]{exc.code.name}[/red]: {exc.message}")
    for field, why in exc.violations:
        err.print(f"  {field}: {why}")
    if exc.retry_after_s is not None:
        err.print(f"  retry after {exc.retry_after_s:.2f}s")
    return typer.Exit(1)


@app.command()
def up(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    nodes: Annotated[int, typer.Option(help="Inference nodes to start.")] = 1,
    models: Annotated[str, typer.Option(help="Comma-separated models per node.")] = (
        "smollm2-135m-instruct,all-minilm-l6-v2"
    ),
    tenants_file: Annotated[
        Path | None, typer.Option(help="Tenants YAML (else a dev tenant).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    port: Annotated[int, typer.Option(help="Scheduler port (0: a free one).")] = 0,
) -> None:
    """Start etcd, Redis, the cache, N nodes and the scheduler; stop all on Ctrl-C/SIGTERM."""
    config = UpConfig(
        run_dir=run_dir,
        nodes=nodes,
        models=[m for m in models.split(",") if m],
        tenants_file=tenants_file,
        device=device,
        dtype=dtype,
        scheduler_port=port,
    )
    sup = Supervisor(config, say=lambda m: console.print(f"[dim]{m}[/dim]"))
    stop_requested = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sup.start()
        print_endpoints(sup, console)
        console.print("Ctrl-C to stop.")
        while not stop_requested and all(c.proc.poll() is None for c in sup.children):
            time.sleep(0.2)
    finally:
        console.print("stopping…")
        sup.stop()


@app.command()
def generate(
    prompt: str,
    model: Annotated[str, typer.Option(help="Model name.")] = "smollm2-135m-instruct",
    chat: Annotated[bool, typer.Option(help="Send as a chat user message (chat models).")] = True,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
) -> None:
    """Stream a generation to the terminal."""

    async def run() -> None:
        async with _connect(endpoint, api_key, run_dir) as client:
            text: str | list[tuple[str, str]] = [("user", prompt)] if chat else prompt
            last = None
            async for chunk in client.generate(
                model, text, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
            ):
                console.print(chunk.text, end="", soft_wrap=True, highlight=False)
                last = chunk
            console.print()
            if last is not None:
                err.print(
                    f"[dim]node {last.node_id or '?'} · {last.usage.completion_tokens} tokens · "
                    f"{'cached' if last.cached else 'generated'}[/dim]"
                )

    _call(run())


@app.command()
def embed(
    texts: list[str],
    model: Annotated[str, typer.Option(help="Embedding model.")] = "all-minilm-l6-v2",
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
) -> None:
    """Embed texts; prints dimensions and the first values of each vector."""

    async def run() -> None:
        async with _connect(endpoint, api_key, run_dir) as client:
            reply = await client.embed(model, texts)
            for text, emb in zip(texts, reply.embeddings, strict=True):
                head = ", ".join(f"{v:+.4f}" for v in emb.values[:6])
                console.print(f"{text!r}: [{head}, …] ({reply.dimensions} dims)")
            err.print(f"[dim]node {reply.node_id} · {reply.usage.prompt_tokens} tokens[/dim]")

    _call(run())


@app.command()
def nodes(
    endpoint: Endpoint = None, api_key: ApiKey = None, run_dir: RunDir = DEFAULT_RUN_DIR
) -> None:
    """The nodes the scheduler sees: health, circuit, models, load."""

    async def run() -> None:
        async with _connect(endpoint, api_key, run_dir) as client:
            table = Table()
            for col in (
                "node",
                "address",
                "state",
                "healthy",
                "circuit",
                "models",
                "running",
                "waiting",
                "tok/s",
            ):
                table.add_column(col)
            for n in await client.list_nodes():
                running = sum(c.running for c in n.load.classes)
                waiting = sum(c.waiting for c in n.load.classes)
                table.add_row(
                    n.info.node_id,
                    n.info.address,
                    "draining" if n.info.state == 2 else "serving",
                    "yes" if n.healthy else "no",
                    admin_pb2.CircuitState.Name(n.circuit).removeprefix("CIRCUIT_STATE_").lower(),
                    ", ".join(m.name for m in n.info.models),
                    str(running),
                    str(waiting),
                    f"{n.load.decode_tokens_per_s:.1f}",
                )
            console.print(table)

    _call(run())


@app.command()
def demo(
    run_dir: RunDir = Path(".sluice/demo"),
    nodes: Annotated[int, typer.Option(help="Inference nodes to start.")] = 2,
) -> None:
    """Start the suite, send real requests, show where they went, shut down."""
    raise typer.Exit(run_demo(run_dir, nodes, console))


def main() -> None:
    """Entry point of the `sluice` console script."""
    app()
