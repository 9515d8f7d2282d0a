"""Where the schedulers are and which of them to call next.

- :func:`configured_endpoints`: endpoints from arguments, else ``SLUICE_ENDPOINTS``; when there
  are none, :func:`etcd_endpoints` says where to discover them (argument, else
  ``SLUICE_ETCD_ENDPOINTS`` / ``SLUICE_ETCD_ENDPOINT``).
- :func:`discover` / :func:`discover_async`: one read of the ``/sluice/schedulers/`` prefix in
  etcd (each scheduler replica publishes a ``sluice.v1.SchedulerInfo`` there on a lease), over
  TLS with a client certificate when given a :class:`~sluice.sdk.tls.TlsConfig` (a local
  suite's etcd accepts only clients with one).
- :class:`EndpointPool`: client-side round robin that skips endpoints whose health check said
  not ``SERVING`` or whose last call failed at the transport level within a cooldown. When no
  endpoint is usable it still returns one (a call that fails says more than a local refusal).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from sluice.contract import SCHEDULERS_PREFIX
from sluice.sdk.errors import UnavailableError
from sluice.sdk.tls import CHANNEL_OPTIONS, Channels, TlsConfig
from sluice.v1 import common_pb2

ENDPOINTS_ENV = "SLUICE_ENDPOINTS"
API_KEY_ENV = "SLUICE_API_KEY"
ETCD_ENDPOINTS_ENVS = ("SLUICE_ETCD_ENDPOINTS", "SLUICE_ETCD_ENDPOINT")


def split_endpoints(value: str | Sequence[str] | None) -> list[str]:
    """``"a:1, b:2"`` or ``["a:1", "b:2"]`` → ``["a:1", "b:2"]`` (blanks and repeats dropped)."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if part and part not in out:
            out.append(part)
    return out


def configured_endpoints(endpoints: str | Sequence[str] | None) -> list[str]:
    """Scheduler endpoints from the argument, else from ``SLUICE_ENDPOINTS``."""
    return split_endpoints(endpoints) or split_endpoints(os.environ.get(ENDPOINTS_ENV))


def etcd_endpoints(endpoints: str | Sequence[str] | None) -> list[str]:
    """etcd endpoints to discover schedulers through: the argument, else the environment."""
    found = split_endpoints(endpoints)
    for env in ETCD_ENDPOINTS_ENVS:
        found = found or split_endpoints(os.environ.get(env))
    return found


def _schedulers_range() -> Any:
    # etcd's protos (and aetcd, which the registry module uses) load only when discovering.
    from aetcd.rpc import rpc_pb2  # noqa: PLC0415

    key = SCHEDULERS_PREFIX.encode()
    range_end = key[:-1] + bytes([key[-1] + 1])
    return rpc_pb2.RangeRequest(key=key, range_end=range_end)


def _kv_stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    from aetcd.rpc import rpc_pb2_grpc  # noqa: PLC0415 - see _range_request

    return rpc_pb2_grpc.KVStub(channel)


def _addresses(reply: Any) -> list[str]:
    out: list[str] = []
    for kv in reply.kvs:
        info = common_pb2.SchedulerInfo()
        try:
            info.ParseFromString(kv.value)
        except Exception:  # a malformed entry is skipped, not fatal
            continue
        if info.address and info.address not in out:
            out.append(info.address)
    return sorted(out)


def _unreachable(etcd: Sequence[str], last: Exception | None) -> UnavailableError:
    # The status, not the multi-line repr of gRPC's error.
    why = f"{last.code().name}: {last.details()}" if isinstance(last, grpc.Call) else repr(last)
    message = f"no etcd endpoint answered ({', '.join(etcd)}): {why}"
    return UnavailableError(grpc.StatusCode.UNAVAILABLE, message)


def _etcd_channels(tls: TlsConfig | Channels | None) -> Channels:
    if isinstance(tls, Channels):
        return tls
    return Channels(tls, verify_as_scheduler=False)


def discover(
    etcd: Sequence[str], timeout_s: float = 3.0, *, tls: TlsConfig | Channels | None = None
) -> list[str]:
    """Scheduler addresses registered in etcd (first etcd endpoint that answers); raises
    :class:`~sluice.sdk.errors.UnavailableError` when none answers. ``tls``: None plaintext,
    else TLS as configured (or channels already made for etcd)."""
    channels = _etcd_channels(tls)
    last: Exception | None = None
    for endpoint in etcd:
        with channels.sync(endpoint) as channel:
            try:
                reply = _kv_stub(channel).Range(_schedulers_range(), timeout=timeout_s)
            except grpc.RpcError as exc:
                last = exc
                continue
        return _addresses(reply)
    raise _unreachable(etcd, last)


async def discover_async(
    etcd: Sequence[str], timeout_s: float = 3.0, *, tls: TlsConfig | Channels | None = None
) -> list[str]:
    """:func:`discover` for asyncio."""
    channels = _etcd_channels(tls)
    last: Exception | None = None
    for endpoint in etcd:
        async with channels.aio(endpoint) as channel:
            try:
                reply = await _kv_stub(channel).Range(_schedulers_range(), timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                last = exc
                continue
        return _addresses(reply)
    raise _unreachable(etcd, last)


@dataclass
class EndpointState:
    """What the client knows about one scheduler endpoint."""

    address: str
    serving: bool | None = None
    """Last health check: True SERVING, False anything else or no answer, None not checked."""
    failed_until: float = 0.0
    """Monotonic time until which a transport failure keeps the endpoint out of rotation."""


class EndpointPool:
    """Round robin over scheduler endpoints, skipping the unhealthy and recently failed.

    Thread-safe (the sync client health-checks from a background thread). Fails open: when no
    endpoint is usable, the next one in turn is returned anyway.
    """

    def __init__(
        self,
        addresses: Iterable[str],
        *,
        failure_cooldown_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._states = [EndpointState(a) for a in addresses]
        if not self._states:
            raise ValueError("no scheduler endpoints")
        self._cooldown = failure_cooldown_s
        self._clock = clock
        self._next = 0
        self._lock = threading.Lock()

    @property
    def addresses(self) -> list[str]:
        """Every endpoint, in rotation order."""
        with self._lock:
            return [s.address for s in self._states]

    def states(self) -> list[EndpointState]:
        """A snapshot of every endpoint's state."""
        with self._lock:
            return [EndpointState(s.address, s.serving, s.failed_until) for s in self._states]

    def replace(self, addresses: Iterable[str]) -> None:
        """Set the endpoints (after a re-discovery), keeping what is known of those that stay."""
        fresh = list(addresses)
        if not fresh:
            return  # keep calling the old ones rather than none
        with self._lock:
            known = {s.address: s for s in self._states}
            self._states = [known.get(a) or EndpointState(a) for a in fresh]
            self._next %= len(self._states)

    def _usable(self, state: EndpointState, now: float) -> bool:
        return state.serving is not False and state.failed_until <= now

    def pick(self, avoid: Iterable[str] = ()) -> str:
        """The next endpoint in turn: usable and not in ``avoid``, else not in ``avoid``,
        else any."""
        avoided = set(avoid)
        now = self._clock()
        with self._lock:
            n = len(self._states)
            order = [(self._next + i) % n for i in range(n)]
            tiers: list[Callable[[EndpointState], bool]] = [
                lambda s: s.address not in avoided and self._usable(s, now),
                lambda s: s.address not in avoided,
                lambda s: True,
            ]
            for accept in tiers:
                for i in order:
                    if accept(self._states[i]):
                        self._next = (i + 1) % n
                        return self._states[i].address
        raise AssertionError("unreachable: the last tier accepts every endpoint")

    def has_usable(self, avoid: Iterable[str] = ()) -> bool:
        """Whether an endpoint outside ``avoid`` is usable now."""
        avoided = set(avoid)
        now = self._clock()
        with self._lock:
            return any(s.address not in avoided and self._usable(s, now) for s in self._states)

    def mark_failed(self, address: str) -> None:
        """A call could not reach ``address``: keep it out of rotation for the cooldown."""
        with self._lock:
            for s in self._states:
                if s.address == address:
                    s.failed_until = self._clock() + self._cooldown

    def set_serving(self, address: str, serving: bool) -> None:
        """Record a health check result; SERVING also ends a failure cooldown."""
        with self._lock:
            for s in self._states:
                if s.address == address:
                    s.serving = serving
                    if serving:
                        s.failed_until = 0.0


__all__ = [
    "API_KEY_ENV",
    "CHANNEL_OPTIONS",
    "ENDPOINTS_ENV",
    "EndpointPool",
    "EndpointState",
    "configured_endpoints",
    "discover",
    "discover_async",
    "etcd_endpoints",
    "split_endpoints",
]
