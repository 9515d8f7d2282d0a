"""What the async and the sync client share: settings, endpoints, stubs, call metadata, the
attempts of a call and the reading of health answers. No I/O here."""

from __future__ import annotations

import math
import os
import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.contract import AUTHORIZATION_METADATA, REQUEST_ID_METADATA, SCHEDULERS_PREFIX
from sluice.sdk.endpoints import (
    API_KEY_ENV,
    ENDPOINTS_ENV,
    ETCD_ENDPOINTS_ENVS,
    EndpointPool,
    EndpointState,
    configured_endpoints,
)
from sluice.sdk.endpoints import etcd_endpoints as resolve_etcd_endpoints
from sluice.sdk.errors import UnavailableError, from_rpc_error
from sluice.sdk.retry import CallAttempts, RetryPolicy
from sluice.sdk.tls import Channels, TlsConfig, resolve_tls
from sluice.v1 import admin_pb2_grpc, inference_pb2_grpc, jobs_pb2_grpc

if TYPE_CHECKING:
    from sluice.sdk.calls import Call

DEFAULT_TIMEOUT_S = 120.0
"""Deadline of a call, retries and the whole stream of a generation included."""
ADMIN_TIMEOUT_S = 10.0
"""Deadline of admin calls when the client's default is longer."""
HEALTH_CHECK_INTERVAL_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 1.0
FAILURE_COOLDOWN_S = 5.0
HEALTH_REQUEST = health_pb2.HealthCheckRequest()


@dataclass(frozen=True)
class Stubs:
    """The stubs of one scheduler endpoint, on a blocking or an asyncio channel."""

    channel: Any
    inference: inference_pb2_grpc.InferenceStub
    admin: admin_pb2_grpc.AdminStub
    jobs: jobs_pb2_grpc.JobsStub
    health: health_pb2_grpc.HealthStub

    @classmethod
    def on(cls, channel: grpc.Channel | grpc.aio.Channel) -> Stubs:
        return cls(
            channel,
            inference_pb2_grpc.InferenceStub(channel),
            admin_pb2_grpc.AdminStub(channel),
            jobs_pb2_grpc.JobsStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )

    def method(self, call: Call) -> Any:
        """The stub's callable for ``call``'s RPC."""
        return getattr(getattr(self, call.service.value), call.method)


class ClientBase:
    """Settings and helpers of :class:`~sluice.sdk.aio.AsyncClient` and
    :class:`~sluice.sdk.sync.Client` (see their docstrings for the arguments)."""

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, so sharing is safe
        etcd_endpoints: str | Sequence[str] | None = None,
        health_check_interval_s: float | None = HEALTH_CHECK_INTERVAL_S,
        failure_cooldown_s: float = FAILURE_COOLDOWN_S,
        tls: TlsConfig | bool | None = None,
    ) -> None:
        self._configured = configured_endpoints(endpoints)
        self._etcd = [] if self._configured else resolve_etcd_endpoints(etcd_endpoints)
        if not self._configured and not self._etcd:
            envs = " or ".join(ETCD_ENDPOINTS_ENVS)
            raise ValueError(
                f"no scheduler endpoints: pass endpoints, set {ENDPOINTS_ENV}, or pass "
                f"etcd_endpoints (or set {envs}) to discover them"
            )
        self._key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        self.tls = resolve_tls(tls, [*self._configured, *self._etcd])
        """How channels are secured (None: plaintext)."""
        self._channels = Channels(self.tls)
        """Scheduler channels (health checks included)."""
        self._etcd_channels = Channels(self.tls, verify_as_scheduler=False)
        """Discovery's channels to etcd."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = timeout_s
        self.retry = retry
        self.health_check_interval_s = health_check_interval_s
        self._cooldown = failure_cooldown_s
        self._rng = random.Random()
        """Jitter of every call's retry delays."""
        self._endpoint_pool: EndpointPool | None = (
            EndpointPool(self._configured, failure_cooldown_s=failure_cooldown_s)
            if self._configured
            else None
        )
        self._init_transport()

    def _init_transport(self) -> None:
        """Set up the transport's own state (channels, health task or thread)."""

    @property
    def endpoints(self) -> list[str]:
        """The scheduler endpoints in rotation (empty until discovery ran)."""
        return self._endpoint_pool.addresses if self._endpoint_pool is not None else []

    def endpoint_states(self) -> list[EndpointState]:
        """What the client knows of each endpoint: health and failure cooldown."""
        return self._endpoint_pool.states() if self._endpoint_pool is not None else []

    @property
    def discovers(self) -> bool:
        """True when the endpoints come from etcd (and are re-read on every health check)."""
        return bool(self._etcd)

    def _pool(self) -> EndpointPool:
        pool = self._endpoint_pool
        if pool is None:
            raise RuntimeError("not connected")
        return pool

    def _new_pool(self, addresses: list[str]) -> EndpointPool:
        if not addresses:
            raise UnavailableError(
                grpc.StatusCode.UNAVAILABLE,
                f"no scheduler registered in etcd {self._etcd} under {SCHEDULERS_PREFIX}",
            )
        return EndpointPool(addresses, failure_cooldown_s=self._cooldown)

    def _metadata(self, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
        """Call metadata: the API key, and one request id for every attempt of a call."""
        items = [(REQUEST_ID_METADATA, request_id or uuid.uuid4().hex)]
        if self._key:
            items.append((AUTHORIZATION_METADATA, f"Bearer {self._key}"))
        return tuple(items)

    def _timeout(self, timeout_s: float | None, cap: float | None = None) -> float:
        if timeout_s is not None:
            return timeout_s
        return min(self.timeout_s, cap) if cap is not None else self.timeout_s

    def _health_answer(self, address: str, answer: object) -> bool | None:
        """Record a health check's reply (or the ``grpc.RpcError`` it raised) and return
        whether the endpoint serves (None: it has no health service)."""
        serving: bool | None
        if isinstance(answer, grpc.RpcError):
            code = answer.code()  # type: ignore[attr-defined]
            serving = None if code == grpc.StatusCode.UNIMPLEMENTED else False
        else:
            serving = getattr(answer, "status", None) == health_pb2.HealthCheckResponse.SERVING
        self._pool().set_serving(address, serving is not False)
        return serving


class Tries:
    """The attempts of one call, for a transport to loop over (the retry logic lives here and
    in :class:`~sluice.sdk.retry.CallAttempts`; the transport only waits and invokes).

    A transport subclass makes it iterable: its first step connects the client, each later
    step waits :attr:`delay`, then every step returns :meth:`next_attempt`.
    """

    def __init__(self, client: ClientBase, call: Call) -> None:
        self.client = client
        self.call = call
        self.metadata = client._metadata(call.request_id)
        self.attempts: CallAttempts | None = None
        self.delay = 0.0
        """Seconds to wait before the next attempt, set when one failed."""
        self.received = False
        """Whether any part of the response reached the caller (then nothing is retried)."""
        self.request: Message | Sequence[Message] = call.request
        """What the next attempt sends: the call's request, or, for a resumable stream, the
        request that continues after the last message delivered."""
        self.progressed = False
        """Whether the current attempt delivered part of a resumable stream."""

    @property
    def started(self) -> bool:
        return self.attempts is not None

    def next_attempt(self) -> Attempt:
        if self.attempts is None:
            self.attempts = CallAttempts(
                self.client.retry, self.client._pool(), self.call.timeout_s, rng=self.client._rng
            )
        return Attempt(self, self.attempts, self.attempts.next_endpoint())


class Attempt:
    """One attempt of a call. As a context manager it ends the attempt's RPC and turns an RPC
    error into the delay before the next attempt, or raises the call's typed error."""

    def __init__(self, tries: Tries, attempts: CallAttempts, endpoint: str) -> None:
        self._tries = tries
        self._attempts = attempts
        self._endpoint = endpoint
        self._rpc: Any = None
        self.done = False
        """Whether the stream's last message arrived (the transport stops reading)."""

    def start(self) -> Any:
        """Invoke the RPC on this attempt's endpoint: a reply, a call to await, or a stream.
        A client stream's messages are sent anew on every attempt."""
        tries = self._tries
        method = tries.client._stub(self._endpoint).method(tries.call)  # type: ignore[attr-defined]
        request = tries.request
        remaining = self._attempts.remaining_s()
        self._rpc = method(
            request if isinstance(request, Message) else iter(request),
            timeout=remaining if math.isfinite(remaining) else None,
            metadata=tries.metadata,
        )
        return self._rpc

    def got(self, message: Any) -> Iterable[Any]:
        """Note that ``message`` of a stream arrived; returns the items it holds for the
        caller. A resumable stream moves its request on past ``message``; any other is no
        longer retried."""
        tries = self._tries
        call = tries.call
        if call.resume is None:
            tries.received = True
        else:
            tries.request = call.resume(tries.request, message)
            tries.progressed = True
        self.done = call.last(message)
        return call.items(message)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if isinstance(self._rpc, grpc.Call | grpc.aio.Call):
            self._rpc.cancel()  # no-op when finished; ends the RPC when the caller stopped early
        progressed, self._tries.progressed = self._tries.progressed, False
        if not isinstance(exc, grpc.RpcError):
            return False
        error = from_rpc_error(exc)  # type: ignore[arg-type]
        if progressed:
            self._attempts.renew(self._endpoint)
        delay = self._attempts.failed(self._endpoint, error, received=self._tries.received)
        if delay is None:
            raise error from exc
        self._tries.delay = delay
        return True
