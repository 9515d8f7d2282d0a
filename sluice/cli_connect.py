"""How every client command of the `sluice` CLI reaches a suite: the connection options, the
blocking client they make, and RPC errors as messages and exit codes.

The scheduler comes from ``--endpoint``, ``SLUICE_ENDPOINTS``, the ``endpoints.json`` of a local
`sluice up` (``--run-dir``), or etcd discovery (``SLUICE_ETCD_ENDPOINTS``); the key from
``--api-key``, ``SLUICE_API_KEY`` or the development key `sluice up` wrote. TLS: ``--insecure``
is plaintext; else ``--ca``, ``--cert``, ``--key`` over ``SLUICE_TLS_CA`` / ``_CERT`` / ``_KEY``
over what `sluice up` wrote when the scheduler or etcd called is that suite's; else plaintext.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

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


def scheduler_address(endpoint: str | None, run_dir: Path) -> str | None:
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


def _tls(address: str | None, run_dir: Path, flags: TlsFlags) -> TlsConfig | bool | None:
    """The client's TLS: ``--insecure`` plaintext; else the flags over the environment over a
    local `sluice up`'s files when ``address`` (else the environment's endpoints or etcd) is
    that suite's; else the SDK's default (TLS with the system's roots off loopback)."""
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
            base = TlsConfig(
                ca=block["ca"],
                cert=block.get("cert"),
                key=block.get("key"),
                server_name=block.get("server_name"),
            )
    if not flags.given:
        return base if base is not None else None  # the SDK's default: TLS off loopback
    base = base or TlsConfig()
    return replace(
        base,
        ca=flags.ca or base.ca,
        cert=flags.cert or base.cert,
        key=flags.key or base.key,
    )


def connect(
    endpoint: str | None, api_key: str | None, run_dir: Path, tls: TlsFlags, **options: Any
) -> Client:
    """A client from flags, env, or the endpoints/dev key/TLS files a local `sluice up` wrote;
    a TLS setting that cannot work (a missing file, a cert without its key) exits 2."""
    address = scheduler_address(endpoint, run_dir)
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
def rpc_errors() -> Iterator[None]:
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
