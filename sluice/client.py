"""Python client for Sluice's public API.

```python
import asyncio
from sluice.client import AsyncClient

async def main() -> None:
    async with AsyncClient("127.0.0.1:50051", api_key="sk-sluice-...") as client:
        async for chunk in client.generate("smollm2-135m-instruct", "Hello!", max_new_tokens=16):
            print(chunk.text, end="", flush=True)

asyncio.run(main())
```

Errors arrive as :class:`SluiceRpcError` subclasses carrying the status details
(``retry_after_s`` from ``RetryInfo``, ``violations`` from ``BadRequest``, ``reason`` from
``ErrorInfo``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from sluice.errors import STATUS_DETAILS_METADATA, unpack_details
from sluice.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
)

DEFAULT_TIMEOUT_S = 120.0


class SluiceRpcError(Exception):
    """A failed call, with its status code and unpacked ``google.rpc`` details."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Message]) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details = list(details)

    def _detail(self, cls: type[Message]) -> Message | None:
        return next((d for d in self.details if isinstance(d, cls)), None)

    @property
    def reason(self) -> str:
        """``ErrorInfo.reason``, a stable machine-readable cause ("" when absent)."""
        info = self._detail(error_details_pb2.ErrorInfo)
        return info.reason if isinstance(info, error_details_pb2.ErrorInfo) else ""

    @property
    def retry_after_s(self) -> float | None:
        """``RetryInfo.retry_delay`` in seconds, when the server said when to come back."""
        info = self._detail(error_details_pb2.RetryInfo)
        if not isinstance(info, error_details_pb2.RetryInfo):
            return None
        return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)

    @property
    def violations(self) -> list[tuple[str, str]]:
        """``BadRequest`` field violations as ``(field, description)``."""
        bad = self._detail(error_details_pb2.BadRequest)
        if not isinstance(bad, error_details_pb2.BadRequest):
            return []
        return [(v.field, v.description) for v in bad.field_violations]


class InvalidRequest(SluiceRpcError):
    """INVALID_ARGUMENT: fix the request (see ``violations``)."""


class AuthenticationError(SluiceRpcError):
    """UNAUTHENTICATED or PERMISSION_DENIED."""


class Overloaded(SluiceRpcError):
    """RESOURCE_EXHAUSTED: come back after ``retry_after_s``."""


class Unavailable(SluiceRpcError):
    """UNAVAILABLE: no node could serve, or one failed mid-stream."""


_TYPES: dict[grpc.StatusCode, type[SluiceRpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(exc: grpc.aio.AioRpcError) -> SluiceRpcError:
    """The typed error for a failed call."""
    details: list[Message] = []
    for key, value in exc.trailing_metadata() or ():
        if key == STATUS_DETAILS_METADATA and isinstance(value, bytes):
            details = unpack_details(status_pb2.Status.FromString(value))
    cls = _TYPES.get(exc.code(), SluiceRpcError)
    return cls(exc.code(), exc.details() or "", details)


class AsyncClient:
    """An asyncio client for one scheduler endpoint.

    ``endpoint`` defaults to the first of ``SLUICE_ENDPOINTS`` (comma-separated), ``api_key``
    to ``SLUICE_API_KEY``.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        endpoint = endpoint or os.environ.get("SLUICE_ENDPOINTS", "").split(",")[0].strip()
        if not endpoint:
            raise ValueError("no endpoint: pass one or set SLUICE_ENDPOINTS")
        self.endpoint = endpoint
        self._key = api_key if api_key is not None else os.environ.get("SLUICE_API_KEY", "")
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(endpoint, options=[("grpc.enable_http_proxy", 0)])
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._key}"),) if self._key else ()

    async def generate(
        self,
        model: str,
        prompt: str | Sequence[tuple[str, str]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        workload_class: int = common_pb2.WORKLOAD_CLASS_REALTIME,
        cache_bypass: bool = False,
        timeout_s: float | None = None,
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """Stream a generation. ``prompt`` is raw text or chat ``(role, content)`` pairs."""
        options = common_pb2.GenerationOptions(stop=list(stop))
        if max_new_tokens is not None:
            options.max_new_tokens = max_new_tokens
        if temperature is not None:
            options.temperature = temperature
        if top_p is not None:
            options.top_p = top_p
        if seed is not None:
            options.seed = seed
        request = inference_pb2.GenerateRequest(
            model=model,
            options=options,
            workload_class=workload_class,  # type: ignore[arg-type]
            cache_bypass=cache_bypass,
        )
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in prompt)
        call = self._inference.Generate(
            request, timeout=timeout_s or self.timeout_s, metadata=self._metadata()
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    async def embed(
        self, model: str, inputs: Sequence[str], *, timeout_s: float | None = None
    ) -> inference_pb2.EmbedResponse:
        """Embed ``inputs``; vectors come back L2-normalised, in input order."""
        try:
            reply: inference_pb2.EmbedResponse = await self._inference.Embed(
                inference_pb2.EmbedRequest(model=model, inputs=list(inputs)),
                timeout=timeout_s or self.timeout_s,
                metadata=self._metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        return reply

    async def list_nodes(self) -> list[admin_pb2.NodeStatus]:
        """Every node the scheduler knows, with health, circuit and load."""
        try:
            reply = await self._admin.ListNodes(
                admin_pb2.ListNodesRequest(), timeout=10, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        return list(reply.nodes)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
