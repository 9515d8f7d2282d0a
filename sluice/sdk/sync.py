"""The blocking transport: :class:`Client`, on blocking ``grpc`` channels (no event loop). The
calls themselves are in :mod:`.calls`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import Any

import grpc

from sluice.sdk.base import HEALTH_CHECK_TIMEOUT_S, HEALTH_REQUEST, Attempt, Stubs, Tries
from sluice.sdk.calls import Api, Call
from sluice.sdk.endpoints import discover
from sluice.v1 import admin_pb2, inference_pb2, jobs_pb2

log = logging.getLogger(__name__)  # stdlib logging: a library leaves configuration to its user


class Client(
    Api[
        Generator[inference_pb2.GenerateChunk, None, None],
        str,
        inference_pb2.EmbedResponse,
        jobs_pb2.Job,
        Generator[jobs_pb2.JobEvent, None, None],
        Generator[jobs_pb2.Job, None, None],
        Generator[jobs_pb2.JobResult, None, None],
        list[admin_pb2.NodeStatus],
        admin_pb2.TenantUsage,
    ]
):
    """A blocking client with the surface of :class:`~sluice.sdk.aio.AsyncClient`.

    ```python
    from sluice import Client

    with Client("127.0.0.1:50051", api_key="sk-sluice-...") as client:
        for chunk in client.generate("smollm2-135m-instruct", [("user", "Hi!")]):
            print(chunk.text, end="", flush=True)
        print(client.embed("all-minilm-l6-v2", ["a cat"]).dimensions)
    ```

    Arguments, retries, round robin and errors are those of ``AsyncClient``. Health checks
    (and re-discovery through etcd) run on a daemon thread while the client is open. It is
    safe to share one client between threads.
    """

    def _init_transport(self) -> None:
        self._stubs: dict[str, Stubs] = {}
        self._lock = threading.Lock()
        self._stubs_lock = threading.Lock()
        self._retired: list[tuple[float, grpc.Channel]] = []
        self._stop = threading.Event()
        self._health_thread: threading.Thread | None = None
        self._connected = False

    # -- connection and health ----------------------------------------------------------

    def connect(self) -> None:
        """Discover the endpoints if needed, check their health once, start health checks.

        Calls connect by themselves; call it to fail early. Raises
        :class:`~sluice.sdk.errors.UnavailableError` when discovery finds no scheduler.
        """
        with self._lock:
            if self._connected:
                return
            if self._stop.is_set():
                raise RuntimeError("the client is closed")
            if self._endpoint_pool is None:
                self._endpoint_pool = self._new_pool(discover(self._etcd, tls=self._etcd_channels))
            if len(self.endpoints) > 1:
                self.check_health()
            if self.health_check_interval_s:
                self._health_thread = threading.Thread(
                    target=self._health_loop,
                    args=(self.health_check_interval_s,),
                    name="sluice-health",
                    daemon=True,
                )
                self._health_thread.start()
            self._connected = True

    def _stub(self, address: str) -> Stubs:
        with self._stubs_lock:
            stubs = self._stubs.get(address)
            if stubs is None:
                stubs = self._stubs[address] = Stubs.on(self._channels.sync(address))
            return stubs

    def check_health(self) -> dict[str, bool | None]:
        """Ask every endpoint's health service now; returns ``{endpoint: serving}`` (None: the
        server has no health service) and updates the rotation."""
        return {address: self._check(address) for address in self._pool().addresses}

    def _check(self, address: str) -> bool | None:
        health = self._stub(address).health
        try:
            answer = health.Check(HEALTH_REQUEST, timeout=HEALTH_CHECK_TIMEOUT_S)
        except grpc.RpcError as exc:
            answer = exc
        return self._health_answer(address, answer)

    def _health_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                if self.discovers:
                    self._pool().replace(discover(self._etcd, tls=self._etcd_channels))
                    self._retire_unused()
                self.check_health()
            except Exception as exc:  # etcd down: keep the endpoints we have
                log.debug("sluice health round failed: %r", exc)

    def _retire_unused(self) -> None:
        """Close the channels of schedulers that left the registry once the default deadline
        has passed since (they are draining: calls in flight there may finish)."""
        now = time.monotonic()
        keep = set(self._pool().addresses)
        with self._stubs_lock:
            for address in [a for a in self._stubs if a not in keep]:
                self._retired.append((now, self._stubs.pop(address).channel))
            due = [c for t, c in self._retired if now - t >= self.timeout_s]
            self._retired = [(t, c) for t, c in self._retired if now - t < self.timeout_s]
        for channel in due:
            channel.close()

    def close(self) -> None:
        """Stop the health thread and close every channel."""
        self._stop.set()
        thread, self._health_thread = self._health_thread, None
        if thread is not None:
            thread.join(timeout=HEALTH_CHECK_TIMEOUT_S * 2 + 1)
        with self._stubs_lock:
            stubs, self._stubs = self._stubs, {}
            retired, self._retired = self._retired, []
        for channel in [*(s.channel for s in stubs.values()), *(c for _, c in retired)]:
            channel.close()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------

    def _unary(self, call: Call) -> Any:
        for attempt in _Tries(self, call):
            with attempt:
                return call.result(attempt.start())

    def _stream(self, call: Call) -> Generator[Any, None, None]:
        for attempt in _Tries(self, call):
            with attempt:
                for message in attempt.start():
                    yield from attempt.got(message)
                    if attempt.done:
                        return
                return

    def _pages(self, call: Call) -> Generator[Any, None, None]:
        while True:
            page = self._unary(call)
            yield from call.items(page)
            if call.last(page):
                return
            call = call.after(page)

    def _text(self, chunks: Iterator[inference_pb2.GenerateChunk]) -> str:
        return "".join(chunk.text for chunk in chunks)


class _Tries(Tries):
    client: Client

    def __iter__(self) -> _Tries:
        return self

    def __next__(self) -> Attempt:
        if self.started:
            time.sleep(self.delay)
        else:
            self.client.connect()
        return self.next_attempt()
