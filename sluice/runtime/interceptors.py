"""Server interceptors shared by every service.

- :class:`ObservabilityInterceptor` (outermost): request id from ``x-request-id`` (or a new
  one) bound into structlog's context, one ``rpc_finished`` summary line per RPC, RPC metrics,
  and the mapping of :class:`sluice.runtime.errors.SluiceError` to a status with rich details.
  Any other exception becomes ``INTERNAL`` with a generic message and one logged traceback.
- :class:`ApiKeyAuth`, run by that interceptor for the methods it guards: turns the
  ``authorization`` metadata into a tenant through an injected authenticator and sets
  :data:`sluice.runtime.context.tenant`.
- :class:`sluice.runtime.tls.CallerCheck`, run by it too: on a mutual-TLS port, only the
  identities a service names may call its methods (PERMISSION_DENIED otherwise).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
import structlog

from sluice import limits
from sluice.contract import AUTHORIZATION_METADATA
from sluice.runtime import context
from sluice.runtime.errors import Internal, InvalidArgument, SluiceError, Unauthenticated
from sluice.runtime.telemetry import RpcMetrics
from sluice.runtime.tls import CallerCheck

log = structlog.get_logger(__name__)

Authenticator = Callable[[str], str | None]
"""Maps an API key to a tenant name, or None when the key is unknown."""

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    """The call's text metadata as a dict (binary ``-bin`` values are skipped)."""
    return {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}


class _Malformed:
    """Stands for a request body that did not parse (the handler refuses it)."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize`` that returns a :class:`_Malformed` instead of raising, so a corrupt
    body answers INVALID_ARGUMENT rather than gRPC's UNKNOWN."""
    if deserialize is None:
        return None

    def parse(body: bytes) -> Any:
        try:
            return deserialize(body)
        except Exception as exc:
            return _Malformed(str(exc) or type(exc).__name__)

    return parse


def _parsed(request: Any) -> None:
    if isinstance(request, _Malformed):
        raise InvalidArgument([("request", f"not a valid message: {request.why[:200]}")])


def _wrap(
    handler: grpc.RpcMethodHandler,
    method: str,
    before: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
    after: Callable[[grpc.aio.ServicerContext, BaseException | None, bool], Awaitable[bool]],
) -> grpc.RpcMethodHandler:
    """Return ``handler`` with ``before`` run first and ``after`` run with the outcome.

    ``after(ctx, exc, streaming)`` is given ``None`` on success. It may raise (to turn an
    exception into a status); a streaming handler's ``after`` may instead set the status on
    ``ctx`` and return True, which ends the stream normally with that status.
    """
    # A single request message is parsed tolerantly (corrupt: INVALID_ARGUMENT); a request
    # stream is the handler's to read.
    single = handler.unary_unary or handler.unary_stream
    deserializer = (
        _tolerant(handler.request_deserializer) if single else handler.request_deserializer
    )
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
            try:
                await before(ctx)
                _parsed(request)
                response = await inner(request, ctx)
            except BaseException as exc:
                await after(ctx, exc, False)
                raise
            await after(ctx, None, False)
            return response

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    inner_stream = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            await before(ctx)
            _parsed(request)
            result = inner_stream(request, ctx)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a coroutine that writes with ctx.write()
                await result
        except BaseException as exc:
            if await after(ctx, exc, True):
                return
            raise
        await after(ctx, None, True)

    factory_s = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return factory_s(
        streaming,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


def _discard(_body: bytes) -> None:
    return None


def _refusing(handler: grpc.RpcMethodHandler, error: SluiceError) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that raises ``error`` without parsing the request (an
    unauthenticated caller's body is received by gRPC but never deserialized)."""

    async def refuse(_request: Any, _ctx: grpc.aio.ServicerContext) -> Any:
        raise error

    async def refuse_stream(_request: Any, _ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        raise error
        yield  # pragma: no cover - makes this an async generator

    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler, refuse),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler, refuse),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler, refuse_stream),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler, refuse_stream),
    )
    _, factory, behaviour = next(k for k in kinds if k[0] is not None)
    return factory(  # type: ignore[no-any-return]
        behaviour,
        request_deserializer=_discard,
        response_serializer=handler.response_serializer,
    )


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, summary logs, RPC metrics and the domain-error → status mapping."""

    def __init__(
        self,
        metrics: RpcMetrics,
        *,
        quiet_methods: Collection[str] = (),
        auth: ApiKeyAuth | None = None,
        callers: CallerCheck | None = None,
    ) -> None:
        self._metrics = metrics
        self._auth = auth
        self._callers = callers
        # Health checks and load streams are frequent; they are counted but not logged.
        self._quiet = set(quiet_methods) | {
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
        }

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = _metadata(handler_call_details)
        incoming = metadata.get(context.REQUEST_ID_METADATA, "")
        oversized = limits.metadata_violations(handler_call_details.invocation_metadata)
        caller = None if oversized or not self._auth else self._auth.check_for(method, metadata)
        if oversized:  # before the API key and the body: metadata alone decides
            handler = _refusing(handler, InvalidArgument(oversized))
        elif isinstance(caller, Unauthenticated):
            handler = _refusing(handler, caller)
        started: dict[str, float] = {}

        async def before(ctx: grpc.aio.ServicerContext) -> None:
            started["t"] = time.perf_counter()
            self._begin(ctx, method, incoming, caller)

        async def after(
            ctx: grpc.aio.ServicerContext, exc: BaseException | None, streaming: bool
        ) -> bool:
            elapsed = time.perf_counter() - started.get("t", time.perf_counter())
            code = grpc.StatusCode.OK
            error: SluiceError | None = None
            if isinstance(exc, SluiceError):
                error = exc
            elif isinstance(exc, BaseException) and not isinstance(
                exc, grpc.aio.AbortError | GeneratorExit
            ):
                if isinstance(exc, asyncio.CancelledError):
                    code = grpc.StatusCode.CANCELLED
                else:
                    log.error("rpc_unhandled_exception", exc_info=exc)
                    error = Internal("internal error")
            elif exc is not None:
                code = ctx.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
            if error is not None:
                code = error.code
            self._metrics.requests.labels(method, code.name).inc()
            self._metrics.duration.labels(method).observe(elapsed)
            if method not in self._quiet:
                fields: dict[str, Any] = {
                    "code": code.name,
                    "duration_ms": round(elapsed * 1000, 3),
                }
                if error is not None:
                    fields["reason"] = error.reason
                    fields["error"] = error.message
                (log.warning if error is not None else log.info)("rpc_finished", **fields)
            if error is None:
                return False
            ctx.set_trailing_metadata(error.trailing_metadata())
            if streaming:
                # The status without an exception: abort() would raise an AbortError through
                # grpc's frames, and each refusal would leave a few dozen objects in reference
                # cycles for the garbage collector, whose passes stall the whole loop.
                ctx.set_code(error.code)
                ctx.set_details(error.message)
                if exc is not None:
                    exc.__traceback__ = None
                return True
            await ctx.abort(error.code, error.message)
            return False  # pragma: no cover - abort() raises

        return _wrap(handler, method, before, after)

    def _begin(
        self,
        ctx: grpc.aio.ServicerContext,
        method: str,
        incoming: str,
        caller: str | Unauthenticated | None,
    ) -> None:
        """Bind the call's request id (and tenant) for logs; refuse a peer that may not call
        ``method``."""
        rid = incoming[:128] or uuid.uuid4().hex
        context.request_id.set(rid)
        structlog.contextvars.bind_contextvars(request_id=rid, rpc=method)
        if isinstance(caller, str):
            context.tenant.set(caller)
            structlog.contextvars.bind_contextvars(tenant=caller)
        if self._callers is not None and (denied := self._callers.check(method, ctx)):
            raise denied


class ApiKeyAuth:
    """Authenticates ``authorization: Bearer <key>`` on the methods of the guarded services.

    Not an interceptor of its own: :class:`ObservabilityInterceptor` runs its check inside the
    one wrapper per call (docs/decisions/runtime-one-interceptor.md), so an auth refusal is
    mapped, logged and counted like any other domain error."""

    def __init__(self, authenticate: Authenticator, guarded_services: Collection[str]) -> None:
        self._authenticate = authenticate
        self._prefixes = tuple(f"/{name}/" for name in guarded_services)

    def check_for(self, method: str, metadata: dict[str, str]) -> str | Unauthenticated | None:
        """The tenant of ``method``'s call, the refusal when its key is missing or unknown,
        or None when the method is not guarded. Decided from metadata alone, before the
        request body is parsed."""
        if not method.startswith(self._prefixes):
            return None
        scheme, _, key = metadata.get(AUTHORIZATION_METADATA, "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return Unauthenticated(
                "missing API key: send metadata 'authorization: Bearer <key>'",
                reason="API_KEY_MISSING",
            )
        tenant = self._authenticate(key.strip())
        return Unauthenticated("API key not valid") if tenant is None else tenant
