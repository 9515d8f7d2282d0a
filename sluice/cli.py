"""The `sluice` command line: run the suite locally and talk to it as a user would.

Every command that talks to a running suite goes through the SDK's blocking
:class:`~sluice.sdk.Client`; it finds the scheduler from ``--endpoint``, ``SLUICE_ENDPOINTS``,
the ``endpoints.json`` of a local `sluice up` (``--run-dir``), or etcd discovery
(``SLUICE_ETCD_ENDPOINTS``), and the key from ``--api-key``, ``SLUICE_API_KEY`` or the
development key `sluice up` wrote. TLS: ``--insecure`` is plaintext; else ``--ca``, ``--cert``,
``--key`` over ``SLUICE_TLS_CA`` / ``_CERT`` / ``_KEY`` over what `sluice up` wrote when the
scheduler or etcd called is that suite's; else plaintext.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from sluice import Client, SluiceRpcError, TlsConfig
from sluice.local.rundir import dev_api_key, read_endpoints, suite_tls
from sluice.sdk.endpoints import (
    API_KEY_ENV,
    ENDPOINTS_ENV,
    ETCD_ENDPOINTS_ENVS,
    configured_endpoints,
    etcd_endpoints,
)
from sluice.sdk.retry import is_transport_failure
from sluice.v1 import admin_pb2

app = typer.Typer(help="Sluice: keep a model-serving fleet answering under overload.")
console = Console()
err = Console(stderr=True)

RunDir = Annotated[Path, typer.Option("--run-dir", help="Run directory of `sluice up`.")]
Endpoint = Annotated[
    str | None,
    typer.Option("--endpoint", help="Scheduler host:port, comma-separated for several."),
]
ApiKey = Annotated[str | None, typer.Option("--api-key", help="API key (else SLUICE_API_KEY).")]
Ca = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        help="CA certificate (PEM) the scheduler's must be signed by (else SLUICE_TLS_CA, "
        "else the run directory's).",
    ),
]
Cert = Annotated[
    Path | None,
    typer.Option("--cert", help="Client certificate (PEM), for etcd (else SLUICE_TLS_CERT)."),
]
Key = Annotated[
    Path | None, typer.Option("--key", help="Key of --cert (PEM) (else SLUICE_TLS_KEY).")
]
Insecure = Annotated[
    bool, typer.Option("--insecure", help="Plaintext, even where the run directory says TLS.")
]
DEFAULT_RUN_DIR = Path(".sluice")


@dataclass(frozen=True)
class TlsFlags:
    """The TLS flags of a command."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False

    @property
    def given(self) -> bool:
        """Whether any of ``--ca``, ``--cert``, ``--key`` was given."""
        return any(f is not None for f in (self.ca, self.cert, self.key))


def _endpoint(endpoint: str | None, run_dir: Path) -> str | None:
    """The flag, else None when the environment names endpoints or etcd, else the scheduler
    of a local `sluice up`."""
    if endpoint or os.environ.get(ENDPOINTS_ENV):
        return endpoint
    if any(os.environ.get(env) for env in ETCD_ENDPOINTS_ENVS):
        return None
    found = _run_dir_scheduler(run_dir)
    if found is None:
        err.print(
            "[red]no scheduler: pass --endpoint, set SLUICE_ENDPOINTS or SLUICE_ETCD_ENDPOINTS, "
            "or run `sluice up`"
        )
        raise typer.Exit(2)
    return found


def _run_dir_scheduler(run_dir: Path) -> str | None:
    """The scheduler address a local `sluice up` recorded, if any."""
    try:
        found: str = read_endpoints(run_dir)["scheduler"]["grpc"]
    except (FileNotFoundError, KeyError):
        return None
    return found


def _api_key(api_key: str | None, run_dir: Path) -> str | None:
    if api_key is None and not os.environ.get(API_KEY_ENV):
        return dev_api_key(run_dir)
    return api_key


def _tls(address: str | None, run_dir: Path, flags: TlsFlags) -> TlsConfig | bool:
    """The client's TLS: ``--insecure`` plaintext; else the flags over the environment over a
    local `sluice up`'s files when ``address`` (else the environment's endpoints or etcd) is
    that suite's; else plaintext."""
    if flags.insecure:
        if flags.given:
            err.print("[red]--insecure goes with none of --ca, --cert, --key")
            raise typer.Exit(2)
        return False
    base = TlsConfig.from_env()
    if base is None:
        called = configured_endpoints(address) or etcd_endpoints(None)
        block = suite_tls(run_dir, called)
        if block is not None:
            base = TlsConfig(ca=block["ca"], cert=block.get("cert"), key=block.get("key"))
    if not flags.given:
        return base if base is not None else False
    base = base or TlsConfig()
    return replace(
        base,
        ca=flags.ca or base.ca,
        cert=flags.cert or base.cert,
        key=flags.key or base.key,
    )


def _connect(
    endpoint: str | None, api_key: str | None, run_dir: Path, tls: TlsFlags, **options: Any
) -> Client:
    """A client from flags, env, or the endpoints/dev key/TLS files a local `sluice up` wrote;
    a TLS setting that cannot work (a missing file, a cert without its key) exits 2."""
    address = _endpoint(endpoint, run_dir)
    try:
        return Client(
            address,
            api_key=_api_key(api_key, run_dir),
            tls=_tls(address, run_dir, tls),
            **options,
        )
    except ValueError as exc:
        err.print(f"[red]{exc}")
        raise typer.Exit(2) from None


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


@contextmanager
def _rpc_errors() -> Iterator[None]:
    """An RPC error becomes a clear message and exit code 1."""
    try:
        yield
    except SluiceRpcError as exc:
        raise _fail(exc) from exc


def _fail(exc: SluiceRpcError) -> typer.Exit:
    err.print(f"[red]{exc.code.name}[/red]: {exc.message}")
    for field, why in exc.violations:
        err.print(f"  {field}: {why}")
    if exc.retry_after_s is not None:
        err.print(f"  retry after {exc.retry_after_s:.2f}s")
    if exc.attempts > 1:
        err.print(f"  after {exc.attempts} attempts")
    if is_transport_failure(exc):
        _tls_hint(exc.message)
    return typer.Exit(1)


def _tls_hint(message: str) -> None:
    """What a transport failure that looks like a TLS mismatch probably means."""
    if "Socket closed" in message:
        err.print(
            "  the server closed the connection, as a TLS server does to a plaintext client "
            "(pass --ca, set SLUICE_TLS_CA, or point --run-dir at its `sluice up`) and a "
            "mutual-TLS one to a client without a certificate (--cert and --key)"
        )
    elif "BAD_CERTIFICATE" in message:
        err.print(
            "  the server refused this client's certificate, or wants one (a local suite's "
            "etcd does): pass --cert and --key, or set SLUICE_TLS_CERT and SLUICE_TLS_KEY"
        )


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
    max_sequences: Annotated[
        int | None,
        typer.Option(help="Each node's batch cap (default: the node's own, 32)."),
    ] = None,
    port: Annotated[int, typer.Option(help="Scheduler port (0: a free one).")] = 0,
    node_nice: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=19,
            help="Nice increment of each node: model compute yields the CPU to "
            "the scheduler and stores on this machine (0: same priority; default 10).",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Plaintext everywhere: no TLS, no client certificates, no etcd or Redis users "
            "(default: a local CA and mutual TLS, in <run-dir>/pki).",
        ),
    ] = False,
) -> None:
    """Start etcd, Redis, the cache, N nodes and the scheduler, restart any that crashes, and
    stop all on Ctrl-C/SIGTERM."""
    with _needs_services():
        from sluice.local.demo import print_endpoints  # noqa: PLC0415
        from sluice.local.up import Supervisor, UpConfig  # noqa: PLC0415

    config = UpConfig(
        run_dir=run_dir,
        nodes=nodes,
        models=[m for m in models.split(",") if m],
        tenants_file=tenants_file,
        device=device,
        dtype=dtype,
        max_sequences=max_sequences,
        scheduler_port=port,
        insecure=insecure,
    )
    if node_nice is not None:
        config.node_cpu_nice = node_nice
    sup = Supervisor(config, say=lambda m: console.print(f"[dim]{m}[/dim]"))
    stop_requested = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with console.status("starting the suite (the first start converts model weights)…"):
            sup.start()
        print_endpoints(sup, console)
        console.print("Ctrl-C to stop.")
        # A crashed child is restarted (or given up) by `poll`; the rest keeps serving.
        while not stop_requested:
            sup.poll()
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
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """Stream a generation to the terminal."""
    text: str | list[tuple[str, str]] = [("user", prompt)] if chat else prompt
    tls = TlsFlags(ca, cert, key, insecure)
    with _rpc_errors(), _connect(endpoint, api_key, run_dir, tls) as client:
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
    with _rpc_errors(), _connect(endpoint, api_key, run_dir, tls) as client:
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
    with _rpc_errors(), _connect(endpoint, api_key, run_dir, tls) as client:
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
    with _rpc_errors(), _connect(endpoint, api_key, run_dir, tls) as client:
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

    address = _endpoint(endpoint, run_dir)
    metrics = metrics or _run_dir_metrics(address, run_dir)
    title = f"sluice top · scheduler {address or 'discovered through etcd'}"
    tls = TlsFlags(ca, cert, key, insecure)
    client = _connect(endpoint, api_key, run_dir, tls, timeout_s=2.0, retry=None)
    names = tenant or [""]
    with _rpc_errors(), client:
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
