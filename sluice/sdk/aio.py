"""The asyncio transport: :class:`AsyncClient` (the calls themselves are in :mod:`.calls`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from types import TracebackType
from typing import Any

import grpc

from sluice.sdk.base import HEALTH_CHECK_TIMEOUT_S, HEALTH_REQUEST, Attempt, Stubs, Tries
from sluice.sdk.calls import Api, Call
from sluice.sdk.endpoints import discover_async
from sluice.v1 import admin_pb2, inference_pb2, jobs_pb2

# A library must not configure logging for its user: stdlib logging, silent unless enabled.
log = logging.getLogger(__name__)


class AsyncClient(
    Api[
        AsyncGenerator[inference_pb2.GenerateChunk, None],
        Awaitable[str],
        Awaitable[inference_pb2.EmbedResponse],
        Awaitable[jobs_pb2.Job],
        AsyncGenerator[jobs_pb2.JobEvent, None],
        AsyncGenerator[jobs_pb2.Job, None],
        AsyncGenerator[jobs_pb2.JobResult, None],
        Awaitable[list[admin_pb2.NodeStatus]],
        Awaitable[admin_pb2.TenantUsage],
    ]
):
    """An asyncio client for Sluice's public API (``Inference``, ``Jobs``, ``Admin``).

    ```python
    import asyncio
    from sluice import AsyncClient

    async def main() -> None:
        async with AsyncClient("127.0.0.1:50051", api_key="sk-sluice-...") as client:
            async for chunk in client.generate("smollm2-135m-instruct", [("user", "Hi!")]):
                print(chunk.text, end="", flush=True)
            reply = await client.embed("all-minilm-l6-v2", ["a cat", "a kitten"])
            print(reply.dimensions)

    asyncio.run(main())
    ```

    Arguments:

    - ``endpoints``: scheduler ``host:port`` (a comma-separated string or a sequence); else
      ``SLUICE_ENDPOINTS``; else discovered in etcd under ``/sluice/schedulers/``.
    - ``api_key``: else ``SLUICE_API_KEY``; sent as ``authorization: Bearer <key>``.
    - ``timeout_s``: default deadline of a call, retries and a whole generation stream included
      (admin calls: at most 10 s); every method takes its own ``timeout_s`` too.
    - ``retry``: :class:`~sluice.sdk.retry.RetryPolicy` for ``RESOURCE_EXHAUSTED`` and
      ``UNAVAILABLE``; ``None`` raises every refusal at once.
    - ``etcd_endpoints``: where to discover schedulers when no endpoints are given (else
      ``SLUICE_ETCD_ENDPOINTS`` / ``SLUICE_ETCD_ENDPOINT``); re-read on every health check.
    - ``health_check_interval_s``: how often a background task asks every endpoint's
      ``grpc.health.v1`` service (``None`` or 0: never); endpoints not ``SERVING`` are skipped.
    - ``failure_cooldown_s``: how long an endpoint that could not be reached stays skipped.
    - ``tls``: :class:`~sluice.sdk.tls.TlsConfig` for every channel (schedulers, health checks,
      discovery); ``True`` TLS with the system's roots; ``False`` plaintext; ``None`` (default)
      from ``SLUICE_TLS_CA`` / ``SLUICE_TLS_CERT`` / ``SLUICE_TLS_KEY``, plaintext without them.

    Round robin over the endpoints; when none is usable the next one is tried anyway. Errors
    are :class:`~sluice.sdk.errors.SluiceRpcError` subclasses carrying the status details.
    The client belongs to the event loop it is first used in; ``close()`` it (or use
    ``async with``) to stop the health task and close the channels.
    """

    def _init_transport(self) -> None:
        self._stubs: dict[str, Stubs] = {}
        self._health_task: asyncio.Task[None] | None = None
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self._connect_lock: asyncio.Lock | None = None
        self._connected = False
        self._closed = False

    # -- connection and health ----------------------------------------------------------

    async def connect(self) -> None:
        """Discover the endpoints if needed, check their health once, start the health task.

        Calls connect by themselves; call it to fail early. Raises
        :class:`~sluice.sdk.errors.UnavailableError` when discovery finds no scheduler.
        """
        if self._connected:
            return
        if self._closed:
            raise RuntimeError("the client is closed")
        self._connect_lock = self._connect_lock or asyncio.Lock()
        async with self._connect_lock:
            if self._connected:
                return
            if self._endpoint_pool is None:
                self._endpoint_pool = self._new_pool(
                    await discover_async(self._etcd, tls=self._etcd_channels)
                )
            if len(self.endpoints) > 1:
                await self.check_health()
            if self.health_check_interval_s:
                self._health_task = asyncio.create_task(
                    self._health_loop(self.health_check_interval_s), name="sluice-client-health"
                )
            self._connected = True

    def _stub(self, address: str) -> Stubs:
        stubs = self._stubs.get(address)
        if stubs is None:
            stubs = self._stubs[address] = Stubs.on(self._channels.aio(address))
        return stubs

    async def check_health(self) -> dict[str, bool | None]:
        """Ask every endpoint's health service now; returns ``{endpoint: serving}`` (None: the
        server has no health service) and updates the rotation."""
        addresses = self._pool().addresses
        results = await asyncio.gather(*(self._check(a) for a in addresses))
        return dict(zip(addresses, results, strict=True))

    async def _check(self, address: str) -> bool | None:
        health = self._stub(address).health
        try:
            answer = await health.Check(HEALTH_REQUEST, timeout=HEALTH_CHECK_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            answer = exc
        return self._health_answer(address, answer)

    async def _health_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self.discovers:
                    self._pool().replace(await discover_async(self._etcd, tls=self._etcd_channels))
                    self._retire_unused()
                await self.check_health()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd down: keep the endpoints we have
                log.debug("sluice health round failed: %r", exc)

    def _retire_unused(self) -> None:
        """Close the channels of schedulers that left the registry. They are draining, so
        calls in flight there may finish first (up to the default deadline)."""
        keep = set(self._pool().addresses)
        for address in [a for a in self._stubs if a not in keep]:
            channel = self._stubs.pop(address).channel
            task = asyncio.create_task(channel.close(grace=self.timeout_s))
            self._retiring[task] = channel
            task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def close(self) -> None:
        """Stop the health task and close every channel."""
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        for task, channel in list(self._retiring.items()):
            task.cancel()
            await channel.close()
        stubs, self._stubs = self._stubs, {}
        for s in stubs.values():
            await s.channel.close()

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- transport -----------------------------------------------------------------------

    async def _unary(self, call: Call) -> Any:
        async for attempt in _Tries(self, call):
            with attempt:
                return call.result(await attempt.start())

    async def _stream(self, call: Call) -> AsyncGenerator[Any, None]:
        async for attempt in _Tries(self, call):
            with attempt:
                async for message in attempt.start():
                    for item in attempt.got(message):
                        yield item
                    if attempt.done:
                        return
                return

    async def _pages(self, call: Call) -> AsyncGenerator[Any, None]:
        while True:
            page = await self._unary(call)
            for item in call.items(page):
                yield item
            if call.last(page):
                return
            call = call.after(page)

    async def _text(self, chunks: AsyncIterator[inference_pb2.GenerateChunk]) -> str:
        return "".join([chunk.text async for chunk in chunks])


class _Tries(Tries):
    client: AsyncClient

    def __aiter__(self) -> _Tries:
        return self

    async def __anext__(self) -> Attempt:
        await (asyncio.sleep(self.delay) if self.started else self.client.connect())
        return self.next_attempt()
