"""What the async and the sync client share: settings, endpoint resolution, call metadata."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Sequence

import grpc

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
from sluice.sdk.errors import Unavailable
from sluice.sdk.retry import RetryPolicy

DEFAULT_TIMEOUT_S = 120.0
"""Deadline of a call, retries and the whole stream of a generation included."""
ADMIN_TIMEOUT_S = 10.0
"""Deadline of admin calls when the client's default is longer."""
HEALTH_CHECK_INTERVAL_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 1.0
FAILURE_COOLDOWN_S = 5.0


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
            raise Unavailable(
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
