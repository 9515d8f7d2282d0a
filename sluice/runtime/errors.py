"""Domain errors and their mapping to gRPC statuses with ``google.rpc`` details.

Handlers raise these; :class:`sluice.runtime.interceptors.ObservabilityInterceptor` turns them
into a status whose ``grpc-status-details-bin`` trailer ``grpcio-status`` builds
(``BadRequest``, ``QuotaFailure``, ``RetryInfo``, ``ErrorInfo`` with a stable ``reason``).
Refusals that carry a retry delay also set the ``grpc-retry-pushback-ms`` trailer, which
gRPC's own retry policy honours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "sluice.dev"
PUSHBACK_METADATA = "grpc-retry-pushback-ms"
STATUS_DETAILS_METADATA = "grpc-status-details-bin"
MAX_MESSAGE_BYTES = 512
"""Longest status message, in UTF-8 bytes; detail texts are cut shorter. Errors quote what
the caller sent, and a client refuses trailers over its metadata limit (8 KiB soft, 16 KiB
hard by default, the message percent-encoded and the details base64-encoded): an answer
quoting a huge field would reach the caller as a transport error instead of its status."""
MAX_DETAIL_BYTES = 160
MAX_VIOLATIONS = 10


def clip(text: str, limit: int = MAX_DETAIL_BYTES) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, saying that it was cut."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 24].decode(errors="ignore") + f"… ({len(raw)} bytes)"


def _clipped(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(clip(a, MAX_DETAIL_BYTES // 2), clip(b)) for a, b in pairs[:MAX_VIOLATIONS]]


class SluiceError(Exception):
    """Base of every error that maps to a definite gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        message = clip(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = {k: clip(v) for k, v in (metadata or {}).items()}

    def details(self) -> list[Message]:
        """The ``google.rpc`` detail messages of this error, ``ErrorInfo`` first."""
        return [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
            )
        ]

    def retry_after(self) -> float | None:
        """Seconds the caller should wait before retrying, when the error says so."""
        return None

    def to_status_proto(self) -> status_pb2.Status:
        """The full ``google.rpc.Status``."""
        packed = []
        for detail in self.details():
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """Trailers to send: the packed status and, for retryable refusals, the pushback."""
        items: list[tuple[str, str | bytes]] = list(
            rpc_status.to_status(self.to_status_proto()).trailing_metadata
        )
        delay = self.retry_after()
        if delay is not None:
            items.append((PUSHBACK_METADATA, str(max(0, math.ceil(delay * 1000)))))
        return tuple(items)


class InvalidArgument(SluiceError):
    """The request is malformed; each violation names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[tuple[str, str]], *, reason: str | None = None) -> None:
        self.violations = _clipped(violations)
        message = "; ".join(f"{field}: {why}" for field, why in self.violations)
        super().__init__(f"invalid request: {message}", reason=reason)

    def details(self) -> list[Message]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in self.violations
            ]
        )
        return [*super().details(), bad]


class Unauthenticated(SluiceError):
    """No API key, or one that matches no tenant."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "API_KEY_INVALID"


class PermissionDenied(SluiceError):
    """The tenant may not use this model or class."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class NotFound(SluiceError):
    """The named thing does not exist (for this tenant)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class Unimplemented(SluiceError):
    """Defined in the contract, not served yet."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "NOT_IMPLEMENTED"


class DeadlineExceeded(SluiceError):
    """The request's deadline passed before it could be answered."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(SluiceError):
    """The work was cancelled (by the client, or by a draining node)."""

    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class _Retryable(SluiceError):
    """An error that tells the caller when to come back."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self._retry_after = retry_after_s

    def retry_after(self) -> float | None:
        return self._retry_after

    def details(self) -> list[Message]:
        out = super().details()
        if self._retry_after is not None:
            seconds = max(0.0, self._retry_after)
            whole = int(seconds)
            delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
            out.append(error_details_pb2.RetryInfo(retry_delay=delay))
        return out


class ResourceExhausted(_Retryable):
    """Over quota or overloaded: refused now, with a time to come back."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        reason: str | None = None,
        quota_violations: Sequence[tuple[str, str]] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s, reason=reason, metadata=metadata)
        self.quota_violations = _clipped(quota_violations)

    def details(self) -> list[Message]:
        out = super().details()
        if self.quota_violations:
            out.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
                        for s, d in self.quota_violations
                    ]
                )
            )
        return out


class Unavailable(_Retryable):
    """No node can serve the request now, or one failed while serving it."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class Internal(SluiceError):
    """A bug or an unexpected failure; the message is generic."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


def status_code_name(code: grpc.StatusCode | None) -> str:
    """``OK``, ``INVALID_ARGUMENT``, …; ``UNKNOWN`` for None."""
    return code.name if code is not None else "UNKNOWN"


class RemoteError(SluiceError):
    """An error a downstream service returned, passed on with its code, details and pushback
    intact (the message gains ``prefix``, and the rich status is re-packed to match it)."""

    def __init__(self, exc: grpc.aio.AioRpcError, *, prefix: str = "") -> None:
        super().__init__(f"{prefix}{exc.details() or exc.code().name}")
        self.code = exc.code()
        self.reason = "UPSTREAM_" + exc.code().name
        try:
            self._upstream = rpc_status.from_call(exc)
        except ValueError:  # a status that contradicts its call: keep our own details
            self._upstream = None
        self._pushback = tuple(
            (k, v) for k, v in (exc.trailing_metadata() or ()) if k == PUSHBACK_METADATA
        )

    def to_status_proto(self) -> status_pb2.Status:
        if self._upstream is None:
            return super().to_status_proto()
        return status_pb2.Status(
            code=self.code.value[0], message=self.message, details=self._upstream.details
        )

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return super().trailing_metadata() + self._pushback
