"""The asyncio client: :class:`AsyncClient`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.sdk.base import (
    ADMIN_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    FAILURE_COOLDOWN_S,
    HEALTH_CHECK_INTERVAL_S,
    HEALTH_CHECK_TIMEOUT_S,
    ClientBase,
)
from sluice.sdk.endpoints import CHANNEL_OPTIONS, discover_async
from sluice.sdk.errors import Unavailable, from_rpc_error
from sluice.sdk.requests import (
    Prompt,
    embed_request,
    generate_request,
    generation_options,
    list_jobs_request,
    submit_job_request,
)
from sluice.sdk.retry import CallAttempts, RetryPolicy
from sluice.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)

# A library must not configure logging for its user: stdlib logging, silent unless enabled.
log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class _Stubs:
    channel: grpc.aio.Channel
    inference: inference_pb2_grpc.InferenceStub
    admin: admin_pb2_grpc.AdminStub
    jobs: jobs_pb2_grpc.JobsStub
    health: health_pb2_grpc.HealthStub

    @classmethod
    def open(cls, address: str) -> _Stubs:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return cls(
            channel,
            inference_pb2_grpc.InferenceStub(channel),
            admin_pb2_grpc.AdminStub(channel),
            jobs_pb2_grpc.JobsStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )


class AsyncClient(ClientBase):
    """An asyncio client for Sluice's public API (``Inference``, ``Jobs``, ``Admin``).

    ```python
    import asyncio
    from sluice import AsyncClient

    async def main() -> None:
        async with AsyncClient("127.0.0.1:50051", api_key="sk-sluice-...") as client:
            async for chunk in client.generate("smollm2-135m-instruct", [("user", "Hi!")]):
                print(chunk.text, end="", flush=True)
            reply = await client.embed("all-minilm-l6-v2", ["a cat", "a kitten"])
            print(reply.dimensions)

    asyncio.run(main())
    ```

    Arguments:

    - ``endpoints``: scheduler ``host:port`` (a comma-separated string or a sequence); else
      ``SLUICE_ENDPOINTS``; else discovered in etcd under ``/sluice/schedulers/``.
    - ``api_key``: else ``SLUICE_API_KEY``; sent as ``authorization: Bearer <key>``.
    - ``timeout_s``: default deadline of a call, retries and a whole generation stream included
      (admin calls: at most 10 s); every method takes its own ``timeout_s`` too.
    - ``retry``: :class:`RetryPolicy` for ``RESOURCE_EXHAUSTED`` and ``UNAVAILABLE`` (see
      :mod:`sluice.sdk.retry`); ``None`` raises every refusal at once.
    - ``etcd_endpoints``: where to discover schedulers when no endpoints are given (else
      ``SLUICE_ETCD_ENDPOINTS`` / ``SLUICE_ETCD_ENDPOINT``); re-read on every health check.
    - ``health_check_interval_s``: how often a background task asks every endpoint's
      ``grpc.health.v1`` service (``None`` or 0: never); endpoints not ``SERVING`` are skipped.
    - ``failure_cooldown_s``: how long an endpoint that could not be reached stays skipped.

    Round robin over the endpoints; when none is usable the next one is tried anyway. Errors
    are :class:`~sluice.sdk.errors.SluiceRpcError` subclasses carrying the status details.
    The client belongs to the event loop it is first used in; ``close()`` it (or use
    ``async with``) to stop the health task and close the channels.
    """

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
        super().__init__(
            endpoints,
            api_key=api_key,
            timeout_s=timeout_s,
            retry=retry,
            etcd_endpoints=etcd_endpoints,
            health_check_interval_s=health_check_interval_s,
            failure_cooldown_s=failure_cooldown_s,
        )
        self._stubs: dict[str, _Stubs] = {}
        self._health_task: asyncio.Task[None] | None = None
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self._connect_lock: asyncio.Lock | None = None
        self._connected = False
        self._closed = False

    # -- connection and health ----------------------------------------------------------

    async def connect(self) -> None:
        """Discover the endpoints if needed, check their health once, start the health task.

        Calls connect by themselves; call it to fail early. Raises
        :class:`~sluice.sdk.errors.Unavailable` when discovery finds no scheduler.
        """
        if self._connected:
            return
        if self._closed:
            raise RuntimeError("the client is closed")
        self._connect_lock = self._connect_lock or asyncio.Lock()
        async with self._connect_lock:
            if self._connected:
                return
            if self._endpoint_pool is None:
                self._endpoint_pool = self._new_pool(await self._discover())
            if len(self.endpoints) > 1:
                await self.check_health()
            interval = self.health_check_interval_s
            if interval:
                self._health_task = asyncio.create_task(
                    self._health_loop(interval), name="sluice-client-health"
                )
            self._connected = True

    async def _discover(self) -> list[str]:
        try:
            return await discover_async(self._etcd)
        except ConnectionError as exc:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc

    def _stub(self, address: str) -> _Stubs:
        stubs = self._stubs.get(address)
        if stubs is None:
            stubs = self._stubs[address] = _Stubs.open(address)
        return stubs

    async def check_health(self) -> dict[str, bool | None]:
        """Ask every endpoint's health service now; returns ``{endpoint: serving}`` (None: the
        server has no health service) and updates the rotation."""
        pool = self._pool()
        addresses = pool.addresses
        results = await asyncio.gather(*(self._check(a) for a in addresses))
        return dict(zip(addresses, results, strict=True))

    async def _check(self, address: str) -> bool | None:
        serving: bool | None
        try:
            reply = await self._stub(address).health.Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_CHECK_TIMEOUT_S
            )
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as exc:
            serving = None if exc.code() == grpc.StatusCode.UNIMPLEMENTED else False
        self._pool().set_serving(address, serving is not False)
        return serving

    async def _health_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self.discovers:
                    self._pool().replace(await discover_async(self._etcd))
                    self._retire_unused()
                await self.check_health()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd down: keep the endpoints we have
                log.debug("sluice health round failed: %r", exc)

    def _retire_unused(self) -> None:
        """Close the channels of schedulers that left the registry. They are draining, so
        calls in flight there may finish first (up to the default deadline)."""
        keep = set(self._pool().addresses)
        for address in [a for a in self._stubs if a not in keep]:
            channel = self._stubs.pop(address).channel
            task = asyncio.create_task(channel.close(grace=self.timeout_s))
            self._retiring[task] = channel
            task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def close(self) -> None:
        """Stop the health task and close every channel."""
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        for task, channel in list(self._retiring.items()):
            task.cancel()
            await channel.close()
        stubs, self._stubs = self._stubs, {}
        for s in stubs.values():
            await s.channel.close()

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- call machinery ------------------------------------------------------------------

    async def _unary(
        self,
        method: Callable[[_Stubs], Callable[..., Awaitable[Any]]],
        request: Any,
        timeout_s: float,
        request_id: str | None = None,
    ) -> Any:
        await self.connect()
        attempts = CallAttempts(self.retry, self._pool(), timeout_s, rng=self._rng)
        metadata = self._metadata(request_id)
        while True:
            endpoint = attempts.next_endpoint()
            try:
                return await method(self._stub(endpoint))(
                    request, timeout=attempts.remaining_s(), metadata=metadata
                )
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                delay = attempts.failed(endpoint, error, received=False)
                if delay is None:
                    raise error from exc
            await asyncio.sleep(delay)

    async def _stream(
        self,
        method: Callable[[_Stubs], Callable[..., Any]],
        request: Any,
        timeout_s: float,
        request_id: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        await self.connect()
        attempts = CallAttempts(self.retry, self._pool(), timeout_s, rng=self._rng)
        metadata = self._metadata(request_id)
        received = False
        while True:
            endpoint = attempts.next_endpoint()
            call = method(self._stub(endpoint))(
                request, timeout=attempts.remaining_s(), metadata=metadata
            )
            try:
                async for item in call:
                    received = True
                    yield item
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                delay = attempts.failed(endpoint, error, received=received)
                if delay is None:
                    raise error from exc
            finally:
                call.cancel()  # no-op when finished; ends the call when the caller stopped early
            await asyncio.sleep(delay)

    # -- Inference -----------------------------------------------------------------------

    def generate(
        self,
        model: str,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        workload_class: int = common_pb2.WORKLOAD_CLASS_REALTIME,
        cache_bypass: bool = False,
        timeout_s: float | None = None,
        ignore_eos: bool = False,
        session_id: str = "",
        request_id: str | None = None,
    ) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        """Stream a generation. ``prompt`` is raw text or chat ``(role, content)`` pairs.

        Nothing is sent until the stream is iterated. Refusals and unreachable schedulers are
        retried per the client's policy until the first chunk arrives, never after: a failure
        mid-stream raises. Closing the stream early (``aclose()``) cancels the generation.
        """
        options = generation_options(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
        )
        request = generate_request(
            model,
            prompt,
            options,
            workload_class=workload_class,
            cache_bypass=cache_bypass,
            session_id=session_id,
        )
        return self._stream(
            lambda s: s.inference.Generate, request, self._timeout(timeout_s), request_id
        )

    async def generate_text(self, model: str, prompt: Prompt, **kwargs: Any) -> str:
        """The whole generated text of :meth:`generate` (same keyword arguments)."""
        return "".join([chunk.text async for chunk in self.generate(model, prompt, **kwargs)])

    async def embed(
        self,
        model: str,
        inputs: Sequence[str],
        *,
        workload_class: int = common_pb2.WORKLOAD_CLASS_REALTIME,
        timeout_s: float | None = None,
    ) -> inference_pb2.EmbedResponse:
        """Embed ``inputs``; vectors come back L2-normalised, in input order."""
        reply = await self._unary(
            lambda s: s.inference.Embed,
            embed_request(model, inputs, workload_class),
            self._timeout(timeout_s),
        )
        return cast(inference_pb2.EmbedResponse, reply)

    # -- Jobs ----------------------------------------------------------------------------

    async def submit_job(
        self,
        spec: jobs_pb2.BatchGenerationSpec | jobs_pb2.FinetuneSpec,
        *,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> jobs_pb2.Job:
        """Submit a job (build a batch with :func:`sluice.sdk.batch_job`); returns at once.

        Without ``idempotency_key`` a fresh one is made, so a retried submit cannot create
        the job twice.
        """
        request = submit_job_request(spec, idempotency_key or uuid.uuid4().hex)
        reply = await self._unary(lambda s: s.jobs.SubmitJob, request, self._timeout(timeout_s))
        return cast(jobs_pb2.Job, reply)

    async def get_job(self, job_id: str, *, timeout_s: float | None = None) -> jobs_pb2.Job:
        """The job's current state."""
        reply = await self._unary(
            lambda s: s.jobs.GetJob,
            jobs_pb2.GetJobRequest(job_id=job_id),
            self._timeout(timeout_s),
        )
        return cast(jobs_pb2.Job, reply)

    def watch_job(
        self, job_id: str, *, timeout_s: float | None = None
    ) -> AsyncGenerator[jobs_pb2.JobEvent, None]:
        """Stream the job's changes until it ends (retried only before the first event)."""
        return self._stream(
            lambda s: s.jobs.WatchJob,
            jobs_pb2.WatchJobRequest(job_id=job_id),
            self._timeout(timeout_s),
        )

    async def cancel_job(self, job_id: str, *, timeout_s: float | None = None) -> jobs_pb2.Job:
        """Cancel the job; items already finished are kept."""
        reply = await self._unary(
            lambda s: s.jobs.CancelJob,
            jobs_pb2.CancelJobRequest(job_id=job_id),
            self._timeout(timeout_s),
        )
        return cast(jobs_pb2.Job, reply)

    async def list_jobs(
        self,
        *,
        state: int | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> jobs_pb2.ListJobsResponse:
        """One page of the tenant's jobs, newest first; pass ``next_page_token`` on."""
        reply = await self._unary(
            lambda s: s.jobs.ListJobs,
            list_jobs_request(state, page_size, page_token),
            self._timeout(timeout_s),
        )
        return cast(jobs_pb2.ListJobsResponse, reply)

    # -- Admin ---------------------------------------------------------------------------

    async def list_nodes(self, *, timeout_s: float | None = None) -> list[admin_pb2.NodeStatus]:
        """Every node the (next) scheduler knows, with health, circuit and load."""
        reply = await self._unary(
            lambda s: s.admin.ListNodes,
            admin_pb2.ListNodesRequest(),
            self._timeout(timeout_s, ADMIN_TIMEOUT_S),
        )
        return list(cast(admin_pb2.ListNodesResponse, reply).nodes)

    async def get_tenant_usage(
        self, tenant: str = "", *, timeout_s: float | None = None
    ) -> admin_pb2.TenantUsage:
        """Usage of ``tenant`` (default: the caller's own) as the (next) scheduler counted it."""
        reply = await self._unary(
            lambda s: s.admin.GetTenantUsage,
            admin_pb2.GetTenantUsageRequest(tenant=tenant),
            self._timeout(timeout_s, ADMIN_TIMEOUT_S),
        )
        return cast(admin_pb2.TenantUsage, reply)
