"""gRPC core's I/O engine for Sluice's service processes, chosen before grpc is loaded.

Services poll their sockets with iomgr on the aio poller thread instead of gRPC's default
EventEngine threads, one thread crossing fewer per read or write
(docs/decisions/runtime-grpc-iomgr.md). Every service's ``__main__`` calls :func:`configure`
first, before anything imports grpc: the engine is read once, when gRPC core starts.
``SLUICE_GRPC_IO=eventengine`` keeps gRPC's default. An operator's own ``GRPC_EXPERIMENTS`` is
never overridden. Library users (the SDK) are not touched: their process keeps whatever engine
they chose.
"""

from __future__ import annotations

import os
import sys

IO_ENGINE_ENV = "SLUICE_GRPC_IO"
ENGINES = ("iomgr", "eventengine")
# The EventEngine experiments that grpcio 1.80-1.85 turns on for Python. gRPC plans to remove
# them once EventEngine has been the default for a while; an unknown name is then logged by
# gRPC at start-up and otherwise ignored, which is the cue to revisit this list.
EVENT_ENGINE_EXPERIMENTS = (
    "event_engine_client",
    "event_engine_listener",
    "event_engine_callback_cq",
    "event_engine_for_all_other_endpoints",
)


def experiments_for(engine: str) -> str | None:
    """The ``GRPC_EXPERIMENTS`` value that selects ``engine`` (None: gRPC's default)."""
    if engine not in ENGINES:
        raise ValueError(f"{IO_ENGINE_ENV} must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "eventengine":
        return None
    return ",".join(f"-{name}" for name in EVENT_ENGINE_EXPERIMENTS)


def configure(environ: dict[str, str] | None = None) -> str:
    """Select the I/O engine for this process (call before grpc is imported); returns it."""
    env = os.environ if environ is None else environ
    engine = env.get(IO_ENGINE_ENV, "iomgr").strip().lower() or "iomgr"
    value = experiments_for(engine)
    if "GRPC_EXPERIMENTS" in env:
        return "operator"  # the operator's own experiment list wins
    if environ is None and "grpc" in sys.modules:
        # Too late to choose: gRPC core may already have read its configuration.
        return "unchanged"
    if value is not None:
        env["GRPC_EXPERIMENTS"] = value
    return engine
