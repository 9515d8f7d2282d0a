"""Typed errors of the SDK: a failed call's status code with its unpacked ``google.rpc`` details.

The hierarchy (every class is a :class:`SluiceRpcError`; the names end in ``Error`` and differ
from the services' domain errors in :mod:`sluice.runtime.errors`)::

    SluiceRpcError                 any failed call; .code .message .details .reason ...
    ├── InvalidRequestError        INVALID_ARGUMENT: fix the request (see .violations)
    ├── AuthenticationError        UNAUTHENTICATED: no key, or an unknown one
    │   └── PermissionDeniedError  PERMISSION_DENIED: the key's tenant may not do this
    ├── ResourceExhaustedError     RESOURCE_EXHAUSTED: refused now, come back later
    │   ├── QuotaExceededError     ... because the tenant is over a quota (QuotaFailure detail)
    │   └── OverloadedError        ... because the fleet is busy (any other refusal)
    ├── UnavailableError           UNAVAILABLE: no node could serve, one failed mid-stream,
    │                              or the scheduler could not be reached
    ├── DeadlineExceededError      DEADLINE_EXCEEDED
    ├── NotFoundError              NOT_FOUND
    ├── AlreadyExistsError         ALREADY_EXISTS (e.g. a fine-tune's adapter name is taken)
    └── UnimplementedError         UNIMPLEMENTED (e.g. jobs on a release without them)

``except ResourceExhaustedError`` catches both kinds of refusal; ``except OverloadedError``
does not catch quota refusals: waiting out a quota and backing off from a busy fleet are
different decisions. Details are read with ``grpcio-status`` (``rpc_status.from_call``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

M = TypeVar("M", bound=Message)


class FailedCall(Protocol):
    """What both ``grpc.aio.AioRpcError`` and the sync ``grpc.RpcError`` calls offer."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...

    def trailing_metadata(self) -> object: ...


class SluiceRpcError(Exception):
    """A failed call, with its status code and unpacked ``google.rpc`` details.

    ``attempts`` counts the attempts the SDK made before giving up (1 when it did not retry).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        details: Sequence[Message] = (),
        *,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details = list(details)
        self.attempts = attempts

    def detail(self, cls: type[M]) -> M | None:
        """The first detail of type ``cls``, if the status carried one."""
        return next((d for d in self.details if isinstance(d, cls)), None)

    @property
    def reason(self) -> str:
        """``ErrorInfo.reason``, a stable machine-readable cause ("" when absent)."""
        info = self.detail(error_details_pb2.ErrorInfo)
        return info.reason if info is not None else ""

    @property
    def retry_after_s(self) -> float | None:
        """``RetryInfo.retry_delay`` in seconds, when the server said when to come back."""
        info = self.detail(error_details_pb2.RetryInfo)
        if info is None:
            return None
        return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """``BadRequest`` field violations as ``(field, description)``."""
        bad = self.detail(error_details_pb2.BadRequest)
        return [(v.field, v.description) for v in bad.field_violations] if bad else []

    @property
    def quota_violations(self) -> list[tuple[str, str]]:
        """``QuotaFailure`` violations as ``(subject, description)``."""
        quota = self.detail(error_details_pb2.QuotaFailure)
        return [(v.subject, v.description) for v in quota.violations] if quota else []

    @property
    def violations(self) -> list[tuple[str, str]]:
        """Everything the server said was wrong, as ``(field or subject, description)``:
        ``BadRequest`` field violations, then ``QuotaFailure`` violations."""
        return self.field_violations + self.quota_violations


class InvalidRequestError(SluiceRpcError):
    """INVALID_ARGUMENT: fix the request (see ``violations``)."""


class AuthenticationError(SluiceRpcError):
    """UNAUTHENTICATED: no API key, or one that matches no tenant."""


class PermissionDeniedError(AuthenticationError):
    """PERMISSION_DENIED: the key's tenant may not use this model, class or resource."""


class ResourceExhaustedError(SluiceRpcError):
    """RESOURCE_EXHAUSTED: refused now; come back after ``retry_after_s`` when it is set."""


class QuotaExceededError(ResourceExhaustedError):
    """RESOURCE_EXHAUSTED with a ``QuotaFailure`` detail: the tenant is over a quota
    (``violations`` names which)."""


class OverloadedError(ResourceExhaustedError):
    """RESOURCE_EXHAUSTED without a quota violation: the fleet is busy (``reason`` says how,
    e.g. ``OVERLOADED``)."""


class UnavailableError(SluiceRpcError):
    """UNAVAILABLE: no node could serve, one failed mid-stream, or no scheduler answered."""


class DeadlineExceededError(SluiceRpcError):
    """DEADLINE_EXCEEDED: the call's deadline passed before it finished."""


class NotFoundError(SluiceRpcError):
    """NOT_FOUND: the named thing (a job, a model) does not exist for this tenant."""


class AlreadyExistsError(SluiceRpcError):
    """ALREADY_EXISTS: what the call would create exists already (an adapter name)."""


class UnimplementedError(SluiceRpcError):
    """UNIMPLEMENTED: the server does not offer this call (yet)."""


_TYPES: dict[grpc.StatusCode, type[SluiceRpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


KNOWN_DETAILS: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.DebugInfo,
    error_details_pb2.ResourceInfo,
)


def unpack_details(status: status_pb2.Status) -> list[Message]:
    """The known ``google.rpc`` detail messages of a status; unknown ones are skipped."""
    out: list[Message] = []
    for packed in status.details:
        cls = next((c for c in KNOWN_DETAILS if packed.Is(c.DESCRIPTOR)), None)
        if cls is not None:
            msg = cls()
            packed.Unpack(msg)
            out.append(msg)
    return out


def status_details(call: FailedCall) -> list[Message]:
    """The ``google.rpc`` details a failed call carried (none when the call never reached a
    server, or when the rich status contradicts the call's own code or message)."""
    try:
        status = rpc_status.from_call(call)
    except ValueError:
        return []
    return unpack_details(status) if status is not None else []


def from_rpc_error(call: FailedCall, *, attempts: int = 1) -> SluiceRpcError:
    """The typed error for a failed call (async or sync)."""
    code = call.code()
    details = status_details(call)
    cls = _TYPES.get(code, SluiceRpcError)
    if cls is OverloadedError and any(
        isinstance(d, error_details_pb2.QuotaFailure) for d in details
    ):
        cls = QuotaExceededError
    return cls(code, call.details() or "", details, attempts=attempts)


__all__ = [
    "AlreadyExistsError",
    "AuthenticationError",
    "DeadlineExceededError",
    "InvalidRequestError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "ResourceExhaustedError",
    "SluiceRpcError",
    "UnavailableError",
    "UnimplementedError",
    "from_rpc_error",
    "status_details",
    "unpack_details",
]
