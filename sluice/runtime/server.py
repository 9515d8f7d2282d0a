"""Server bootstrap shared by every service: one ``grpc.aio`` server with health, reflection,
message-size and keepalive options, the shared interceptors, and graceful shutdown.

A service builds a :class:`GrpcServer`, adds its servicers, ``await start()``, then
``await wait_for_signal()`` (SIGTERM/SIGINT) and ``await stop()``. ``stop`` flips every health
status to ``NOT_SERVING`` first (so balancers stop sending), then lets in-flight calls finish
within the grace period.

A service whose dependency is not there yet starts with ``start(serving=False)``: the port
opens at once and health says ``NOT_SERVING`` until it calls ``set_serving(True)``, each change
logged (``health_changed``) with its reason.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from sluice.runtime.interceptors import ApiKeyAuth, Authenticator, ObservabilityInterceptor
from sluice.runtime.telemetry import RpcMetrics
from sluice.runtime.tls import CallerCheck, ServerTls

log = structlog.get_logger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerOptions:
    """Transport settings of a service's gRPC server."""

    host: str = "127.0.0.1"
    """Interface to bind; tests and `sluice up` use loopback."""
    port: int = 0
    """Port to bind; 0 picks a free one (read it back from ``GrpcServer.port``)."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest request or response message."""
    max_streams_per_connection: int = 1024
    """Most calls one connection may have open at once (HTTP/2 max concurrent streams); more
    wait on the client's side, so one connection cannot hold unbounded server state."""
    keepalive_time_s: float = 30.0
    """Ping an idle connection this often, so dead peers are noticed."""
    keepalive_timeout_s: float = 10.0
    """Close a connection whose ping goes unanswered this long."""
    grace_s: float = 10.0
    """How long ``stop`` lets in-flight calls finish before cancelling them."""
    quiet_methods: Sequence[str] = field(default_factory=tuple)
    """Methods counted in metrics but not logged per call (e.g. load streams)."""
    tls: ServerTls | None = None
    """TLS on the port (mutual for internal services); None serves plaintext."""


class GrpcServer:
    """A service's gRPC server with the shared plumbing already in place."""

    def __init__(
        self,
        name: str,
        options: ServerOptions,
        registry: CollectorRegistry,
        *,
        authenticate: Authenticator | None = None,
        guarded_services: Sequence[str] = (),
        callers: CallerCheck | None = None,
    ) -> None:
        self.name = name
        self.options = options
        auth = ApiKeyAuth(authenticate, guarded_services) if authenticate is not None else None
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ObservabilityInterceptor(
                RpcMetrics.create(registry),
                quiet_methods=options.quiet_methods,
                auth=auth,
                callers=callers if options.tls is not None else None,
            )
        ]
        ms = options.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", ms),
                ("grpc.max_receive_message_length", ms),
                ("grpc.max_concurrent_streams", options.max_streams_per_connection),
                ("grpc.keepalive_time_ms", int(options.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(options.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._services: list[str] = []
        self._status: dict[str, bool] = {}
        self.port = 0

    def add(
        self, adder: Callable[[object, grpc.aio.Server], None], servicer: object, name: str
    ) -> None:
        """Register a servicer (``adder`` is the generated ``add_*Servicer_to_server``)."""
        adder(servicer, self.server)
        self._services.append(name)

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (after ``start``)."""
        return f"{self.options.host}:{self.port}"

    async def start(self, *, serving: bool = True, reason: str = "") -> int:
        """Bind, start, and mark every service ``SERVING`` (or ``NOT_SERVING`` for ``reason``
        when ``serving`` is False); returns the bound port."""
        reflection.enable_server_reflection(
            [*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        bind = f"{self.options.host}:{self.options.port}"
        tls = self.options.tls
        self.port = (
            self.server.add_secure_port(bind, tls.credentials())
            if tls is not None
            else self.server.add_insecure_port(bind)
        )
        if self.port == 0:
            raise OSError(f"could not bind {self.options.host}:{self.options.port}")
        await self.server.start()
        await self.set_serving(serving, reason=reason)
        log.info(
            "server_started",
            service=self.name,
            address=self.address,
            serving=serving,
            tls="off" if tls is None else ("mutual" if tls.require_client_auth else "server"),
        )
        return self.port

    async def set_serving(
        self, serving: bool, *, reason: str = "", services: Sequence[str] | None = None
    ) -> None:
        """Set the health status of ``services`` (default: the overall status and every
        service's); a change is logged with ``reason``."""
        status = SERVING if serving else NOT_SERVING
        names = ["", *self._services] if services is None else list(services)
        # The first SERVING is the normal start (``server_started`` says it); log the rest.
        changed = [n for n in names if self._status.get(n, True) is not serving]
        for service in names:
            self._status[service] = serving
            await self.health.set(service, status)
        if changed:
            log.info(
                "health_changed",
                service=self.name,
                serving=serving,
                reason=reason,
                services=[n or "(overall)" for n in changed],
            )

    def is_serving(self, service: str = "") -> bool:
        """The health status last set for ``service`` (``""``: overall)."""
        return self._status.get(service, False)

    async def stop(self, grace_s: float | None = None) -> None:
        """Go ``NOT_SERVING``, let in-flight calls finish within the grace, then stop."""
        await self.health.enter_graceful_shutdown()
        grace = self.options.grace_s if grace_s is None else grace_s
        await self.server.stop(grace)
        log.info("server_stopped", service=self.name)


async def wait_for_signal(*signals: signal.Signals) -> signal.Signals:
    """Wait until one of ``signals`` (default SIGTERM, SIGINT) arrives; returns it."""
    wanted = signals or (signal.SIGTERM, signal.SIGINT)
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def deliver(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig)

    for sig in wanted:
        loop.add_signal_handler(sig, deliver, sig)
    try:
        got = await received
    finally:
        for sig in wanted:
            loop.remove_signal_handler(sig)
    log.info("signal_received", signal=got.name)
    return got
