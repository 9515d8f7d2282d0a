"""The floor under a refusal's latency: a bare gRPC ``Inference`` server that refuses every
``Generate`` at once, with the scheduler's status (``RESOURCE_EXHAUSTED``, ``ErrorInfo``,
``RetryInfo`` and the ``grpc-retry-pushback-ms`` trailer) and none of its work (no interceptors,
no authentication, no quota, no admission, no log line).

``bench.scheduler`` starts it as a child process beside the scheduler, on the same CPUs, event
loop (``sluice.runtime.runner.run_loop``) and gRPC I/O engine (``sluice.runtime.grpc_io``), and
times refusals from it with the scheduler's own probes, in the same phases
(``docs/decisions/bench-refusal-floor.md``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Sequence

from sluice.runtime import grpc_io

grpc_io.configure()  # before grpc loads, as every service does: the same gRPC I/O engine

# E402 on each import below: they must follow grpc_io.configure() above.
import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

from sluice.runtime.errors import ResourceExhausted  # noqa: E402
from sluice.runtime.runner import run_loop, settle_heap  # noqa: E402
from sluice.runtime.server import wait_for_signal  # noqa: E402
from sluice.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402

REFUSAL = ResourceExhausted(
    "overloaded: predicted wait 3.2 s is past the deadline", retry_after_s=3.2
)
"""The refusal every call gets: the shape of the scheduler's unmeetable-deadline refusal."""


class RefuseAll(inference_pb2_grpc.InferenceServicer):
    """Refuses every generation, as cheaply as grpc.aio allows."""

    def __init__(self) -> None:
        self._trailers = REFUSAL.trailing_metadata()

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        context.set_trailing_metadata(self._trailers)
        await context.abort(REFUSAL.code, REFUSAL.message)
        yield inference_pb2.GenerateChunk()  # never reached: makes this a streaming handler


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM / SIGINT."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    inference_pb2_grpc.add_InferenceServicer_to_server(RefuseAll(), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    settle_heap()
    await wait_for_signal()
    await server.stop(0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.scheduler.refusal_floor --host H --port P`` (other service flags are
    ignored)."""
    p = argparse.ArgumentParser(prog="python -m bench.scheduler.refusal_floor", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args, _ = p.parse_known_args(argv)
    run_loop(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
