"""The shared composition-root loop of every service's ``__main__``.

Configure logging once, serve ``/metrics``, build and start the service, wait for SIGTERM /
SIGINT (or a service-specific event, such as a node finishing a drain), then stop gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector

from sluice.runtime.server import wait_for_signal
from sluice.runtime.settings import ServiceSettings
from sluice.runtime.telemetry import MetricsServer, configure_logging

log = structlog.get_logger(__name__)

T = TypeVar("T")
EVENT_LOOP_ENV = "SLUICE_EVENT_LOOP"


def event_loop_kind() -> str:
    """The loop :func:`run_loop` runs on: ``uvloop`` (libuv) when it is installed, else
    ``asyncio``'s own (docs/decisions/runtime-uvloop.md). ``SLUICE_EVENT_LOOP=asyncio`` forces
    the latter, ``uvloop`` makes a missing uvloop an ``ImportError``; any other value is a
    ``ValueError``."""
    choice = os.environ.get(EVENT_LOOP_ENV, "auto").lower()
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"{EVENT_LOOP_ENV} must be auto, uvloop or asyncio, not {choice!r}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401, PLC0415 - optional: not built for every platform
    except ImportError:
        if choice == "uvloop":
            raise
        return "asyncio"
    return "uvloop"


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop of :func:`event_loop_kind`."""
    if event_loop_kind() == "uvloop":
        import uvloop  # noqa: PLC0415 - optional, present: event_loop_kind imported it

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


class Service(Protocol):
    """What ``run_service`` drives."""

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC server once started."""
        ...

    async def start(self) -> None:
        """Start serving."""
        ...

    async def stop(self) -> None:
        """Stop gracefully."""
        ...


async def run_service(
    name: str,
    settings: ServiceSettings,
    build: Callable[[CollectorRegistry, str], Awaitable[Service]],
    *,
    until: Callable[[Service], Awaitable[object]] | None = None,
) -> None:
    """Run one service until a stop signal (or ``until(service)`` returns), then stop it.

    ``build(registry, metrics_address)`` constructs the service with the metrics registry it
    records into and the address its ``/metrics`` endpoint is served on.
    """
    configure_logging(settings.log_format, settings.log_level)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, open fds
    metrics = MetricsServer(registry, settings.metrics_host, settings.metrics_port)
    metrics.start()
    try:
        service = await build(registry, metrics.address)
        await service.start()
        settle_heap()
        log.info("service_ready", service=name, address=service.address, metrics=metrics.address)
        waiters: set[asyncio.Future[object]] = {asyncio.ensure_future(wait_for_signal())}
        if until is not None:
            waiters.add(asyncio.ensure_future(until(service)))
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await service.stop()
    finally:
        metrics.stop()


def lower_cpu_priority(increment: int) -> int:
    """Raise the nice value of every thread of this process by ``increment`` (0-19); return
    the main thread's new one (docs/decisions/node-cpu-nice.md says when to use it).

    Linux keeps a nice value per thread and a new thread inherits its creator's: threads
    started after the call run at the lowered priority, and those already running are lowered
    one by one, the scan repeated until it finds no thread it has not seen. Without
    ``/proc/self/task`` (not Linux) it is ``os.nice``, which there applies to the whole process.
    """
    if not 0 <= increment <= 19:
        raise ValueError(f"a CPU nice increment is 0-19, not {increment}")
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return os.nice(increment)
    lowered: set[int] = set()
    while fresh := {int(t.name) for t in tasks.iterdir()} - lowered:
        for tid in fresh:
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                now = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(19, now + increment))
        lowered |= fresh
    return os.getpriority(os.PRIO_PROCESS, os.getpid())


def settle_heap() -> None:
    """Move everything built at start-up out of the cyclic collector's way: collect once, then
    ``gc.freeze()`` it into the permanent generation, so a full pass only walks what was
    allocated since. Call it once the service is started; the collector's thresholds are left
    at their defaults (docs/decisions/runtime-gc-freeze.md)."""
    gc.collect()
    gc.freeze()
