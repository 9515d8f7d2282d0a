"""Logging and metrics shared by every service.

``configure_logging`` is called once, from a service's ``__main__``. Metrics live in a
``CollectorRegistry`` injected into whatever records them and are served on their own port.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from typing import Literal

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

LogFormat = Literal["auto", "json", "console"]

RPC_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
"""Seconds; 2.0 is the REALTIME time-to-first-token objective the SLO alerts count against."""


def configure_logging(fmt: LogFormat = "auto", level: str = "info") -> None:
    """Configure structlog (and stdlib logging underneath) for this process.

    JSON lines when ``fmt`` is ``json`` or stderr is not a terminal, coloured console otherwise.
    Request id, tenant and class bound with ``structlog.contextvars`` appear on every event.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)


@dataclass
class RpcMetrics:
    """Per-RPC metrics recorded by the server interceptor."""

    requests: Counter
    duration: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> RpcMetrics:
        """Register the RPC metrics in ``registry``."""
        return cls(
            requests=Counter(
                "sluice_rpc_requests",
                "RPCs handled, by method and final status code.",
                ["method", "code"],
                registry=registry,
            ),
            duration=Histogram(
                "sluice_rpc_duration_seconds",
                "Time from RPC start to its final status, by method.",
                ["method"],
                buckets=RPC_LATENCY_BUCKETS,
                registry=registry,
            ),
        )


class MetricsServer:
    """Prometheus ``/metrics`` over HTTP on its own port (0 picks a free one)."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0):
        self._registry = registry
        self._host = host
        self._port = port
        self._server: object | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        """Start serving; returns the bound port."""
        server, thread = start_http_server(self._port, addr=self._host, registry=self._registry)
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        return self.port

    @property
    def address(self) -> str:
        """``host:port`` of the endpoint."""
        return f"{self._host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and join the thread."""
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
