"""The machine's refusal floor through each run of ``make bench-slo``: a bare gRPC server that
refuses every ``Generate`` (:mod:`bench.scheduler.refusal_floor`), probed from the load client's
own event loop while a run goes, so each level's refusal p99 can be read against what any
refusal costs on this machine at that moment
(docs/decisions/bench-refusal-tail-kernel-tick.md).

:class:`RefusalFloor` is an observer of :class:`bench.overload.benchmark.Benchmark`'s runs, as
the metrics :class:`bench.slo.signals.Sampler` is (:class:`Observers` holds both). A probe every
:data:`PROBE_INTERVAL_S` costs the client and the floor about a millisecond of CPU each, the
same in every run of both suites.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.overload.benchmark import Observer
from bench.stats import percentile
from sluice import AsyncClient
from sluice.local.health import wait_serving
from sluice.local.stores import free_port
from sluice.runtime.auth import new_api_key
from sluice.sdk.errors import SluiceRpcError

PROBE_INTERVAL_S = 0.05
"""Pause between the end of one probe and the next: a little under 20 probes a second, as the
overload experiments of 2026-12-07 probed."""
START_TIMEOUT_S = 30.0

Key = tuple[str, float, int]


class RefusalFloor:
    """The bare refusal server (started by :meth:`start`, stopped by its PID) and the refusal
    times probed during each run, by run key."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.address = ""
        self.times: dict[Key, list[float]] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server on a free loopback port; returns once its health check says
        ``SERVING`` (``RuntimeError`` if it exits first, ``TimeoutError`` after
        :data:`START_TIMEOUT_S`, the process stopped either way)."""
        port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bench.scheduler.refusal_floor", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.address = f"127.0.0.1:{port}"
        try:
            wait_serving(self.address, self._proc, self.log_path, START_TIMEOUT_S, "refusal floor")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @contextlib.contextmanager
    def watch(self, key: Key) -> Iterator[list[float]]:
        """Probe the floor from the running event loop until the block ends (entered inside a
        run's coroutine); the refusal times are kept under ``key``."""
        times = self.times[key] = []
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._probe(times, stop))
        try:
            yield times
        finally:
            stop.set()
            task.cancel()  # a probe in flight is dropped; the loop's shutdown awaits the task

    async def _probe(self, times: list[float], stop: asyncio.Event) -> None:
        client = AsyncClient(self.address, api_key=new_api_key(), retry=None)
        try:
            await self._refusal(client)  # the channel's set-up, not timed
            while not stop.is_set():
                seconds = await self._refusal(client)
                if seconds is not None and not stop.is_set():
                    times.append(seconds)
                await asyncio.sleep(PROBE_INTERVAL_S)
        finally:
            await client.close()

    @staticmethod
    async def _refusal(client: AsyncClient) -> float | None:
        """One call's seconds to its refusal; None for anything else (the floor gone)."""
        began = time.perf_counter()
        try:
            async for _ in client.generate("floor", "hello", max_new_tokens=1):
                pass
        except SluiceRpcError as exc:
            if exc.code.name == "RESOURCE_EXHAUSTED":
                return time.perf_counter() - began
        return None

    def summary(self, keys: list[Key]) -> dict[str, Any] | None:
        """The floor over the runs at ``keys`` (a pooled level has several): how many probes,
        their p50 and p99 in seconds; None when none was probed."""
        times = [t for k in keys for t in self.times.get(k, [])]
        if not times:
            return None
        return {
            "count": len(times),
            "p50_s": percentile(times, 50),
            "p99_s": percentile(times, 99),
        }


class Observers:
    """Several observers as one: each run is watched by all of them, in order."""

    def __init__(self, *observers: Observer) -> None:
        self._observers = observers

    @contextlib.contextmanager
    def watch(self, key: Key) -> Iterator[None]:
        """Every observer's context, held through the run."""
        with contextlib.ExitStack() as stack:
            for observer in self._observers:
                stack.enter_context(observer.watch(key))
            yield
