"""Service registry over etcd (``aetcd``).

- :class:`Registration` puts one key on a lease and keeps the lease alive. If etcd loses the
  lease (restart without data, long partition), the keepalive notices and registers again.
  ``stop`` revokes the lease, so the key disappears at once; a crashed process's key disappears
  when its lease expires (TTL, rounded up by etcd to at least 2 s).
- :class:`PrefixView` keeps a live ``{key: value}`` view of a prefix: a full read, then a watch
  from the next revision. Any watch error, and a periodic full re-read, resynchronise it, so it
  survives etcd restarts, compaction and reconnects without a restart of its owner.

Neither has to wait for etcd: ``Registration.start(retry_in_background=True)`` and
``PrefixView.start(within_s=...)`` return at once when etcd is down and keep trying (backoff up
to 2 s), so a service can open its port and say ``NOT_SERVING`` until ``registered`` or
``synced`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import aetcd
import grpc
import structlog
from aetcd import rpc as etcd_rpc
from aetcd import watcher as etcd_watcher

from sluice.runtime.tls import Identity, Mesh, Role
from sluice.runtime.waits import wait_event

log = structlog.get_logger(__name__)


T = TypeVar("T")


ETCD_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}
"""gRPC's reconnect backoff grows to 120 s by default: after a long outage etcd would be found
minutes after it came back. Capped at 1 s, a returning etcd is found within about a second."""


def etcd_client(endpoint: str, timeout_s: float = 3.0, mesh: Mesh | None = None) -> aetcd.Client:
    """A client for ``host:port``; connects lazily, reconnects by itself (at least every
    second while etcd is unreachable). With a secure ``mesh`` it speaks mutual TLS, verifies
    that etcd's certificate names ``etcd.sluice``, and etcd knows it by its certificate's
    common name (no password)."""
    host, _, port = endpoint.rpartition(":")
    kwargs = {"host": host or "127.0.0.1", "port": int(port), "timeout": timeout_s}
    if mesh is None or mesh.files is None:
        return aetcd.Client(**kwargs, options=ETCD_CHANNEL_OPTIONS)
    options = dict(mesh.channel_options(Identity(Role.ETCD), list(ETCD_CHANNEL_OPTIONS.items())))
    return _TlsEtcdClient(mesh.files.channel_credentials(), **kwargs, options=options)


class _TlsEtcdClient(aetcd.Client):
    """``aetcd.Client`` over a TLS channel: aetcd 1.0 itself opens only plaintext channels, so
    ``connect`` is aetcd's own with the channel made secure (authentication is the client
    certificate, so there is no token to fetch)."""

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        # Another task is connecting: wait for it, as aetcd does (aetcd is untyped).
        if self._is_connecting:  # type: ignore[has-type]
            async with asyncio.timeout(self._connect_wait_timeout):  # not wait_for: waits.py
                await self._connected.wait()
            return
        try:
            self._is_connecting = True
            self.channel = grpc.aio.secure_channel(
                f"{self._host}:{self._port}", self._credentials, options=self._options.items()
            )
            self.kvstub = etcd_rpc.KVStub(self.channel)
            self.clusterstub = etcd_rpc.ClusterStub(self.channel)
            self.leasestub = etcd_rpc.LeaseStub(self.channel)
            self.maintenancestub = etcd_rpc.MaintenanceStub(self.channel)
            self._watcher = etcd_watcher.Watcher(
                etcd_rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


class Registration:
    """One registry entry kept alive on a lease."""

    def __init__(self, client: aetcd.Client, key: str, value: bytes, ttl_s: int = 3) -> None:
        self._client = client
        self.key = key
        self._value = value
        self.ttl_s = max(2, ttl_s)
        self._lease: aetcd.Lease | None = None
        self._task: asyncio.Task[None] | None = None
        self.registrations = 0
        """How many times the key was (re)put on a fresh lease."""
        self.registered = asyncio.Event()
        """Set once the key was first put in etcd."""
        self.last_error = ""
        """Why the last attempt to reach etcd failed (empty once one succeeded)."""

    async def start(self, *, retry_in_background: bool = False) -> bool:
        """Register now and keep the lease alive; returns True once registered.

        If etcd is unreachable this raises, or, with ``retry_in_background``, returns False
        and keeps trying in the background (backoff up to 2 s, then the keepalive), setting
        ``registered`` when it succeeds.
        """
        try:
            await self._register()
        except Exception as exc:
            if not retry_in_background:
                raise
            self.last_error = repr(exc)
            log.warning("registry_register_failed", key=self.key, error=self.last_error)
            self._task = asyncio.create_task(self._retry(), name=f"register {self.key}")
            return False
        self._task = asyncio.create_task(self._keepalive(), name=f"keepalive {self.key}")
        return True

    async def _retry(self) -> None:
        backoff = 0.1
        while True:
            await asyncio.sleep(backoff)
            try:
                await self._register()
                break
            except Exception as exc:  # etcd still down: keep trying
                self.last_error = repr(exc)
                backoff = min(backoff * 2, 2.0)
        await self._keepalive()

    async def update(self, value: bytes) -> None:
        """Replace the published value (same lease)."""
        self._value = value
        if self._lease is not None:
            await self._client.put(self.key.encode(), value, lease=self._lease)

    async def _register(self) -> None:
        self._lease = await self._client.lease(self.ttl_s)
        await self._client.put(self.key.encode(), self._value, lease=self._lease)
        self.registrations += 1
        self.last_error = ""
        self.registered.set()
        log.info("registry_registered", key=self.key, lease=self._lease.id, ttl_s=self.ttl_s)

    async def _keepalive(self) -> None:
        interval = self.ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                lease = self._lease
                reply = await self._client.refresh_lease(lease.id) if lease else None
                if reply is None or reply.TTL <= 0:
                    log.warning("registry_lease_lost", key=self.key)
                    await self._register()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd down or restarting: keep trying
                log.warning("registry_keepalive_failed", key=self.key, error=repr(exc))

    def abandon(self) -> None:
        """Stop keeping the lease alive without revoking it, as a crashed process would."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def stop(self) -> None:
        """Stop the keepalive and revoke the lease (the key disappears at once)."""
        self.abandon()
        if self._lease is not None:
            try:
                await self._client.revoke_lease(self._lease.id)
            except Exception as exc:
                log.warning("registry_revoke_failed", key=self.key, error=repr(exc))
            self._lease = None


class PrefixView(Generic[T]):
    """A live, decoded view of every key under a prefix."""

    def __init__(
        self,
        client: aetcd.Client,
        prefix: str,
        decode: Callable[[bytes], T],
        *,
        resync_interval_s: float = 5.0,
    ) -> None:
        self._client = client
        self.prefix = prefix
        self._decode = decode
        self._resync_interval = resync_interval_s
        self._items: dict[str, T] = {}
        self._listeners: list[Callable[[str, T | None], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._attempted = asyncio.Event()
        self.synced = asyncio.Event()
        """Set once the first full read is applied."""
        self.last_error = ""
        """Why the last read or watch failed (empty after a successful read)."""

    def items(self) -> dict[str, T]:
        """A copy of the current view, keyed by the part of the key after the prefix."""
        return dict(self._items)

    def get(self, name: str) -> T | None:
        """The value under ``prefix + name``, if present."""
        return self._items.get(name)

    def subscribe(self, listener: Callable[[str, T | None], None]) -> None:
        """Call ``listener(name, value)`` on every change; ``value`` is None on removal."""
        self._listeners.append(listener)

    async def start(self, *, within_s: float | None = None) -> bool:
        """Start following the prefix; returns True once the first full read is applied.

        With ``within_s``, returns False as soon as the first read fails, or after ``within_s``,
        and keeps trying in the background (``synced`` is set when a read succeeds).
        """
        self._task = asyncio.create_task(self._run(), name=f"watch {self.prefix}")
        if within_s is None:
            await self.synced.wait()
        else:
            await wait_event(self._attempted, within_s)
        return self.synced.is_set()

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_for(self, predicate: Callable[[dict[str, T]], bool], within_s: float) -> None:
        """Wait until ``predicate(view)`` holds (raises ``TimeoutError`` after ``within_s``)."""
        async with asyncio.timeout(within_s):
            while not predicate(self._items):
                self._changed.clear()
                await self._changed.wait()

    def _set(self, name: str, value: T | None) -> None:
        if value is None:
            if self._items.pop(name, None) is None:
                return
        else:
            self._items[name] = value
        self._changed.set()
        for listener in self._listeners:
            try:
                listener(name, value)
            except Exception as exc:
                log.error("registry_listener_failed", prefix=self.prefix, error=repr(exc))

    def _decode_kv(self, raw: bytes) -> T | None:
        try:
            return self._decode(raw)
        except Exception as exc:
            log.warning("registry_value_undecodable", prefix=self.prefix, error=repr(exc))
            return None

    async def _resync(self) -> int:
        """Replace the view with a full read; returns the revision read."""
        result = await self._client.get_prefix(self.prefix.encode())
        fresh: dict[str, T] = {}
        for kv in result:
            value = self._decode_kv(kv.value)
            if value is not None:
                fresh[kv.key.decode()[len(self.prefix) :]] = value
        for gone in set(self._items) - set(fresh):
            self._set(gone, None)
        for name, value in fresh.items():
            if self._items.get(name) != value:
                self._set(name, value)
        self.last_error = ""
        self.synced.set()
        self._attempted.set()
        return int(result.header.revision)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                revision = await self._resync()
                backoff = 0.1
                await self._follow(revision + 1)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = repr(exc)
                self._attempted.set()
                log.warning("registry_watch_failed", prefix=self.prefix, error=self.last_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _follow(self, start_revision: int) -> None:
        """Apply watch events until the periodic resync is due (or the watch fails)."""
        watch = await self._client.watch_prefix(self.prefix.encode(), start_revision=start_revision)
        try:
            async with asyncio.timeout(self._resync_interval):
                async for event in watch:
                    name = event.kv.key.decode()[len(self.prefix) :]
                    if event.kind == aetcd.EventKind.PUT:
                        self._set(name, self._decode_kv(event.kv.value))
                    else:
                        self._set(name, None)
        except TimeoutError:
            pass  # time for the periodic full read
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()
