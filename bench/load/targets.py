"""Where a load run sends its requests: a small :class:`Target` protocol and its two servers.

* :class:`SluiceTarget`: the scheduler, through the SDK's ``AsyncClient`` with retries off, so
  every refusal is seen and counted (one client per API key, as each tenant has its own).
* :class:`NaiveTarget`: the naive baseline (:mod:`bench.overload.naive_server`), through a plain
  ``Inference`` stub; it needs no key.

Both stream ``sluice.v1.GenerateChunk`` messages and turn every failure into a
:class:`TargetError` carrying the status code name and its ``google.rpc`` details. Only Sluice
embeds; the naive baseline answers an Embed with ``UNIMPLEMENTED``.

A third target, ``openai`` (an OpenAI-compatible server such as vLLM's own, over HTTP), lives in
:mod:`bench.load.openai_target`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc

from bench.load.scenario import PlannedRequest
from sluice import AsyncClient, SluiceRpcError
from sluice.contract import WorkloadClass
from sluice.sdk.errors import from_rpc_error
from sluice.v1 import common_pb2, inference_pb2, inference_pb2_grpc

TARGETS = ("sluice", "naive", "openai")


class TargetError(Exception):
    """A request the target failed: status code name, message and the details that matter."""

    def __init__(
        self, code: str, message: str, *, reason: str = "", retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class GenerationSettings:
    """What every request of a run shares."""

    model: str
    ignore_eos: bool = True
    temperature: float = 0.0
    cache_bypass: bool = True


class Target(Protocol):
    """A server a load run can drive."""

    name: str

    def generate(self, request: PlannedRequest) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """Stream one request's chunks; raise :class:`TargetError` when it fails."""
        ...

    async def embed(self, request: PlannedRequest) -> int:
        """Embed the request's texts and return how many vectors came back; raise
        :class:`TargetError` when it fails."""
        ...

    async def close(self) -> None:
        """Release channels."""
        ...


def _options(settings: GenerationSettings, request: PlannedRequest) -> common_pb2.GenerationOptions:
    options = common_pb2.GenerationOptions(
        max_new_tokens=request.max_new_tokens, ignore_eos=settings.ignore_eos
    )
    if settings.temperature > 0:
        options.temperature = settings.temperature
    return options


class SluiceTarget:
    """The Sluice scheduler through the SDK (``retry=None``: refusals reach the caller)."""

    name = "sluice"

    def __init__(
        self, endpoint: str, api_keys: Mapping[str, str], settings: GenerationSettings
    ) -> None:
        """``api_keys`` maps tenant name → key; tenants sharing a key share a client."""
        self._settings = settings
        self._clients: dict[str, AsyncClient] = {}
        self._by_tenant: dict[str, AsyncClient] = {}
        for tenant, key in api_keys.items():
            if key not in self._clients:
                self._clients[key] = AsyncClient(endpoint, api_key=key, retry=None)
            self._by_tenant[tenant] = self._clients[key]

    async def generate(self, request: PlannedRequest) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """One streamed generation as the tenant of ``request``."""
        client = self._by_tenant[request.tenant]
        s = self._settings
        try:
            async for chunk in client.generate(
                request.model or s.model,
                request.prompt,
                max_new_tokens=request.max_new_tokens,
                temperature=s.temperature if s.temperature > 0 else None,
                workload_class=WorkloadClass.from_label(request.workload_class),
                cache_bypass=s.cache_bypass,
                timeout_s=request.timeout_s,
                ignore_eos=s.ignore_eos,
            ):
                yield chunk
        except SluiceRpcError as exc:
            raise _error_from_sdk(exc) from exc

    async def embed(self, request: PlannedRequest) -> int:
        """One Embed of the request's texts as its tenant; the number of vectors."""
        client = self._by_tenant[request.tenant]
        try:
            reply = await client.embed(
                request.model or self._settings.model,
                list(request.texts),
                workload_class=WorkloadClass.from_label(request.workload_class),
                timeout_s=request.timeout_s,
            )
        except SluiceRpcError as exc:
            raise _error_from_sdk(exc) from exc
        return len(reply.embeddings)

    async def close(self) -> None:
        """Close every client."""
        for client in self._clients.values():
            await client.close()


def _error_from_sdk(exc: SluiceRpcError) -> TargetError:
    return TargetError(
        exc.code.name, exc.message, reason=exc.reason, retry_after_s=exc.retry_after_s
    )


def _error_from_rpc(exc: grpc.aio.AioRpcError) -> TargetError:
    error = from_rpc_error(exc)
    return TargetError(
        exc.code().name, error.message, reason=error.reason, retry_after_s=error.retry_after_s
    )


class NaiveTarget:
    """The naive one-at-a-time server, through a plain stub on one channel."""

    name = "naive"

    def __init__(self, endpoint: str, settings: GenerationSettings) -> None:
        self._settings = settings
        self._channel = grpc.aio.insecure_channel(endpoint, options=[("grpc.enable_http_proxy", 0)])
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    async def generate(self, request: PlannedRequest) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """One streamed generation (the class is sent; the naive server ignores it)."""
        message = inference_pb2.GenerateRequest(
            model=request.model or self._settings.model,
            prompt=request.prompt,
            options=_options(self._settings, request),
            workload_class=WorkloadClass.from_label(request.workload_class),  # type: ignore[arg-type]
            cache_bypass=self._settings.cache_bypass,
        )
        try:
            async for chunk in self._stub.Generate(message, timeout=request.timeout_s):
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise _error_from_rpc(exc) from exc

    async def embed(self, request: PlannedRequest) -> int:
        """Always ``UNIMPLEMENTED``: the naive baseline serves generation only."""
        raise TargetError("UNIMPLEMENTED", "the naive baseline serves generation only")

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()
