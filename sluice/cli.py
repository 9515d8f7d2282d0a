"""The `sluice` command line: run the suite locally and talk to it as a user would.

Every command that talks to a running suite goes through the SDK's blocking
:class:`~sluice.sdk.Client`, made from the connection options of :mod:`sluice.cli_connect`
(where it finds the scheduler, the key and the TLS settings). The ``jobs`` commands live in
:mod:`sluice.cli_jobs`.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.live import Live
from rich.table import Table

from sluice.cli_connect import (
    DEFAULT_RUN_DIR,
    ApiKey,
    Ca,
    Cert,
    Endpoint,
    Insecure,
    Key,
    RunDir,
    TlsFlags,
    connect,
    console,
    err,
    rpc_errors,
    scheduler_address,
)
from sluice.cli_jobs import jobs_app
from sluice.local.rundir import read_endpoints
from sluice.v1 import admin_pb2

if TYPE_CHECKING:
    from sluice.local.up import Supervisor

app = typer.Typer(help="Sluice: keep a model-serving fleet answering under overload.")
app.add_typer(jobs_app, name="jobs")


@contextmanager
def _needs_services() -> Iterator[None]:
    """Imports of the local suite: without the services installed, say how to get them."""
    try:
        yield
    except ImportError as exc:
        err.print(
            f"[red]this command runs the services, which are not installed ({exc.name} is "
            "missing): pip install 'sluice\\[node]'"
        )
        raise typer.Exit(2) from None


KEEP_ENGINE_CORES_HELP = (
    "Keep the cores a node's engine binds its compute to (vLLM on the CPU) for it: the nodes, "
    "stores and services move their other threads off them."
)


PrefixCaching = Annotated[
    bool,
    typer.Option(
        help="With --engine vllm: nodes cache the KV of prompt prefixes (vLLM's default)."
    ),
]
StreamPace = Annotated[
    bool,
    typer.Option(
        help="With --engine vllm: a step carries only the prompt tokens that keep every "
        "decoding stream at its class's pace (else vLLM fills each step to its token budget)."
    ),
]
NodeNice = Annotated[
    int | None,
    typer.Option(
        min=0,
        max=19,
        help="Nice increment of each node: model compute yields the CPU to "
        "the scheduler and stores on this machine (0: same priority; default 10).",
    ),
]


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
    dtype: Annotated[
        str,
        typer.Option(
            help="auto (bfloat16 where the hardware computes in it), float32 or bfloat16."
        ),
    ] = "auto",
    max_sequences: Annotated[
        int | None,
        typer.Option(help="Each node's batch cap (default: the node's own, 32)."),
    ] = None,
    pools: Annotated[
        str,
        typer.Option(help="Comma-separated pools of every node: realtime, finetune or both."),
    ] = "realtime,finetune",
    port: Annotated[int, typer.Option(help="Scheduler port (0: a free one).")] = 0,
    engine: Annotated[
        str,
        typer.Option(help="Nodes' engine: builtin, or vllm (in .venv-vllm: make setup-vllm)."),
    ] = "builtin",
    prefix_caching: PrefixCaching = True,
    pace: StreamPace = True,
    node_nice: NodeNice = None,
    keep_engine_cores: Annotated[bool, typer.Option(help=KEEP_ENGINE_CORES_HELP)] = True,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Plaintext everywhere: no TLS, no client certificates, no etcd or Redis users "
            "(default: a local CA and mutual TLS, in <run-dir>/pki).",
        ),
    ] = False,
    observe: Annotated[
        bool,
        typer.Option(
            "--observe",
            help="Also start Prometheus (when a prometheus binary is installed) scraping the "
            "suite, with Sluice's alert rules loaded; prints its URL.",
        ),
    ] = False,
) -> None:
    """Start etcd, Redis, the cache, N nodes and the scheduler, restart any that crashes, and
    stop all on Ctrl-C/SIGTERM."""
    with _needs_services():
        from sluice.local.up import Supervisor, UpConfig  # noqa: PLC0415

    config = UpConfig(
        run_dir=run_dir,
        nodes=nodes,
        models=[m for m in models.split(",") if m],
        tenants_file=tenants_file,
        device=device,
        dtype=dtype,
        max_sequences=max_sequences,
        pools=[p for p in pools.split(",") if p],
        scheduler_port=port,
        insecure=insecure,
        engine=engine,
        vllm_prefix_caching=prefix_caching,
        vllm_pace=pace,
        keep_engine_cores=keep_engine_cores,
    )
    if node_nice is not None:
        config.node_cpu_nice = node_nice
    _supervise(Supervisor(config, say=lambda m: console.print(f"[dim]{m}[/dim]")), observe)


def _supervise(sup: Supervisor, observe: bool) -> None:
    """Start the suite (and its Prometheus with ``observe``), keep it running until SIGINT or
    SIGTERM, then stop everything we started."""
    from sluice.local.demo import print_endpoints  # noqa: PLC0415 - needs the services
    from sluice.local.observe import PrometheusProcess, start_observer  # noqa: PLC0415

    stop_requested = False
    prometheus: PrometheusProcess | None = None

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with console.status("starting the suite (the first start converts model weights)…"):
            endpoints = sup.start()
        print_endpoints(sup, console)
        if observe:
            prometheus = start_observer(endpoints, sup.run_dir, console.print)
        console.print("Ctrl-C to stop.")
        # A crashed child is restarted (or given up) by `poll`; the rest keeps serving.
        while not stop_requested:
            sup.poll()
            time.sleep(0.2)
    finally:
        console.print("stopping…")
        if prometheus is not None:
            prometheus.stop()
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
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """Stream a generation to the terminal."""
    text: str | list[tuple[str, str]] = [("user", prompt)] if chat else prompt
    tls = TlsFlags(ca, cert, key, insecure)
    with rpc_errors(), connect(endpoint, api_key, run_dir, tls) as client:
        last = None
        for chunk in client.generate(
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


@app.command()
def embed(
    texts: list[str],
    model: Annotated[str, typer.Option(help="Embedding model.")] = "all-minilm-l6-v2",
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """Embed texts; prints dimensions and the first values of each vector."""
    tls = TlsFlags(ca, cert, key, insecure)
    with rpc_errors(), connect(endpoint, api_key, run_dir, tls) as client:
        reply = client.embed(model, texts)
        for text, emb in zip(texts, reply.embeddings, strict=True):
            head = ", ".join(f"{v:+.4f}" for v in emb.values[:6])
            console.print(f"{text!r}: [{head}, …] ({reply.dimensions} dims)")
        err.print(f"[dim]node {reply.node_id} · {reply.usage.prompt_tokens} tokens[/dim]")


@app.command()
def nodes(
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """The nodes the scheduler sees: health, circuit, models, load."""
    tls = TlsFlags(ca, cert, key, insecure)
    with rpc_errors(), connect(endpoint, api_key, run_dir, tls) as client:
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
        for n in client.list_nodes():
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


Tenants = Annotated[
    list[str] | None,
    typer.Option("--tenant", help="Tenant to show (repeatable; default: the key's own)."),
]


@app.command()
def tenants(
    tenant: Tenants = None,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """Tenant usage as the scheduler counted it (Admin.GetTenantUsage)."""
    from sluice.local.top import Sample, tenants_table  # noqa: PLC0415 - only this command needs it

    tls = TlsFlags(ca, cert, key, insecure)
    with rpc_errors(), connect(endpoint, api_key, run_dir, tls) as client:
        usage = [client.get_tenant_usage(name) for name in tenant or [""]]
        console.print(tenants_table(Sample(at=time.monotonic(), usage=usage), None))


@app.command()
def top(
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    metrics: Annotated[
        str | None,
        typer.Option(help="Scheduler /metrics host:port (else from the run directory)."),
    ] = None,
    tenant: Tenants = None,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """A live view of nodes, queues by class, tenants and request rates (Ctrl-C to quit).

    --once: two samples --interval apart (for rates), one frame, exit 1 without a scheduler.
    """
    from sluice.local.top import collect, render  # noqa: PLC0415 - only this command needs it

    address = scheduler_address(endpoint, run_dir)
    metrics = metrics or _run_dir_metrics(address, run_dir)
    title = f"sluice top · scheduler {address or 'discovered through etcd'}"
    tls = TlsFlags(ca, cert, key, insecure)
    client = connect(endpoint, api_key, run_dir, tls, timeout_s=2.0, retry=None)
    names = tenant or [""]
    with rpc_errors(), client:
        prev = collect(client, metrics, names)
        if once:
            time.sleep(interval)
            cur = collect(client, metrics, names)
            console.print(render(cur, prev, title))
            if cur.nodes is None:
                raise typer.Exit(1)
            return
        try:
            with Live(render(prev, None, title), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(max(0.0, prev.at + interval - time.monotonic()))
                    cur = collect(client, metrics, names)
                    live.update(render(cur, prev, title), refresh=True)
                    prev = cur
        except KeyboardInterrupt:
            pass


def _run_dir_metrics(address: str | None, run_dir: Path) -> str | None:
    """The scheduler's /metrics address a local `sluice up` recorded, if it is the same
    scheduler we talk to."""
    try:
        scheduler: dict[str, str] = read_endpoints(run_dir)["scheduler"]
    except (FileNotFoundError, KeyError):
        return None
    if address is not None and scheduler.get("grpc") != address:
        return None
    return scheduler.get("metrics")


@app.command()
def demo(
    run_dir: RunDir = Path(".sluice/demo"),
    nodes: Annotated[int, typer.Option(help="Inference nodes to start.")] = 2,
) -> None:
    """Start the suite, send real requests, show where they went, shut down."""
    with _needs_services():
        from sluice.local.demo import run_demo  # noqa: PLC0415

    raise typer.Exit(run_demo(run_dir, nodes, console))


def main() -> None:
    """Entry point of the `sluice` console script."""
    app()
