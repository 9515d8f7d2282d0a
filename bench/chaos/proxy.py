"""An asyncio TCP fault proxy: listens on a port and forwards every connection to an upstream
``host:port``, with a fault mode that can be changed while connections are open.

This machine's kernel has no ``tc netem`` (``/work/shared/NOTES.md``), so network faults
between two services are made here, at the TCP level, below gRPC:

- ``PASS``: bytes are forwarded as they come, both ways.
- ``LATENCY``: every chunk read from either side is delivered ``latency_ms`` after it was read,
  in order. Chunks are not serialised behind each other's delay (a chunk read 1 ms after
  another is delivered 1 ms after it), so this adds latency, as netem's ``delay`` does, without
  capping throughput.
- ``BLACKHOLE``: connections are accepted and held open, and nothing is forwarded in either
  direction; bytes read meanwhile are kept and delivered, in order, once the mode changes back
  (TCP would retransmit them after a partition heals). A connection accepted in this mode only
  connects upstream once the mode changes.
- ``RESET``: every open connection is aborted with a TCP RST (``SO_LINGER`` 0) and new ones
  are reset as soon as they are accepted.

Only bytes are touched: the proxy knows nothing of HTTP/2 or gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass


class Mode(enum.Enum):
    """What the proxy does to the bytes."""

    PASS = "pass"
    LATENCY = "latency"
    BLACKHOLE = "blackhole"
    RESET = "reset"


class _Reset(Exception):
    """The connection is to be reset (the proxy entered ``RESET`` or stopped)."""


@dataclass
class ProxyStats:
    """What went through the proxy since it started."""

    connections: int = 0
    """Connections accepted."""
    resets: int = 0
    """Connections aborted by ``RESET`` (open ones and those accepted in that mode)."""
    bytes_forwarded: int = 0
    """Bytes delivered to either side."""


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Forwards ``listen_host:listen_port`` (0: a free port) to ``upstream``.

    ``start`` binds and returns the port; ``set_mode`` changes the fault for open and new
    connections at once; ``stop`` aborts every connection and closes the listener.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen = (listen_host, listen_port)
        self.mode = Mode.PASS
        self.latency_s = 0.0
        self.stats = ProxyStats()
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port the proxy listens on (after ``start``)."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> int:
        """Bind and start accepting; returns the listening port."""
        host, port = self.listen
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        return self.port

    async def stop(self) -> None:
        """Abort every connection (as ``RESET`` does) and stop listening."""
        if self._server is not None:
            self._server.close()
        self.set_mode(Mode.RESET)
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def set_mode(self, mode: Mode, latency_ms: float = 0.0) -> None:
        """Change the fault now; ``latency_ms`` is used by ``LATENCY`` only."""
        self.mode = mode
        self.latency_s = max(0.0, latency_ms) / 1000.0 if mode is Mode.LATENCY else 0.0
        if mode is Mode.RESET:
            for writer in list(self._writers):
                self.stats.resets += 1
                _abort(writer)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _open(self) -> None:
        """Wait while black-holed; raise ``_Reset`` in ``RESET``."""
        while self.mode is Mode.BLACKHOLE:
            await self._changed.wait()
        if self.mode is Mode.RESET:
            raise _Reset

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.stats.connections += 1
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._open()
            up_reader, upstream = await asyncio.open_connection(*self.upstream)
            self._writers.add(upstream)
            await self._both_ways(reader, writer, up_reader, upstream)
        except _Reset:
            self.stats.resets += 1
        except (OSError, asyncio.IncompleteReadError):
            pass  # either side went away: close the other below
        finally:
            for side in (writer, upstream):
                if side is not None:
                    self._writers.discard(side)
                    side.close()
            if task is not None:
                self._tasks.discard(task)

    async def _both_ways(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> None:
        """Both directions until both ends closed; the first failure ends both."""
        pipes = [
            asyncio.create_task(self._pipe(reader, upstream)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        try:
            done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            for finished in done:
                finished.result()
            await asyncio.gather(*pipes)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: a reader task timestamps chunks into a queue, this task delivers
        each when its time has come and the mode lets it through."""
        queue: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        done = False

        async def read() -> None:
            nonlocal done
            try:
                while data := await reader.read(65536):
                    queue.append((time.monotonic() + self.latency_s, data))
                    arrived.set()
            finally:
                done = True
                arrived.set()

        reading = asyncio.create_task(read())
        try:
            while True:
                if not queue:
                    if done:
                        break
                    arrived.clear()
                    await arrived.wait()
                    continue
                due, data = queue[0]
                await self._open()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # the mode may have changed meanwhile
                queue.popleft()
                writer.write(data)
                await writer.drain()
                self.stats.bytes_forwarded += len(data)
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
