"""The synchronous client: :class:`Client`, on blocking ``grpc`` channels (no event loop)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

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
from sluice.sdk.endpoints import CHANNEL_OPTIONS, discover
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

log = logging.getLogger(__name__)  # stdlib logging: a library leaves configuration to its user


@dataclass(frozen=True)
class _Stubs:
    channel: grpc.Channel
    inference: inference_pb2_grpc.InferenceStub
    admin: admin_pb2_grpc.AdminStub
    jobs: jobs_pb2_grpc.JobsStub
    health: health_pb2_grpc.HealthStub

    @classmethod
    def open(cls, address: str) -> _Stubs:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        return cls(
            channel,
            inference_pb2_grpc.InferenceStub(channel),
            admin_pb2_grpc.AdminStub(channel),
            jobs_pb2_grpc.JobsStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )


class Client(ClientBase):
    """A blocking client with the surface of :class:`~sluice.sdk.aio.AsyncClient`.

    ```python
    from sluice import Client

    with Client("127.0.0.1:50051", api_key="sk-sluice-...") as client:
        for chunk in client.generate("smollm2-135m-instruct", [("user", "Hi!")]):
            print(chunk.text, end="", flush=True)
        print(client.embed("all-minilm-l6-v2", ["a cat"]).dimensions)
    ```

    Arguments, retries, round robin and errors are those of ``AsyncClient``. Health checks
    (and re-discovery through etcd) run on a daemon thread while the client is open. It is
    safe to share one client between threads.
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
        self._lock = threading.Lock()
        self._stubs_lock = threading.Lock()
        self._retired: list[tuple[float, grpc.Channel]] = []
        self._stop = threading.Event()
        self._health_thread: threading.Thread | None = None
        self._connected = False

    # -- connection and health ----------------------------------------------------------

    def connect(self) -> None:
        """Discover the endpoints if needed, check their health once, start health checks.

        Calls connect by themselves; call it to fail early. Raises
        :class:`~sluice.sdk.errors.Unavailable` when discovery finds no scheduler.
        """
        with self._lock:
            if self._connected:
                return
            if self._stop.is_set():
                raise RuntimeError("the client is closed")
            if self._endpoint_pool is None:
                try:
                    addresses = discover(self._etcd)
                except ConnectionError as exc:
                    raise Unavailable(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
                self._endpoint_pool = self._new_pool(addresses)
            if len(self.endpoints) > 1:
                self.check_health()
            interval = self.health_check_interval_s
            if interval:
                self._health_thread = threading.Thread(
                    target=self._health_loop, args=(interval,), name="sluice-health", daemon=True
                )
                self._health_thread.start()
            self._connected = True

    def _stub(self, address: str) -> _Stubs:
        with self._stubs_lock:
            stubs = self._stubs.get(address)
            if stubs is None:
                stubs = self._stubs[address] = _Stubs.open(address)
            return stubs

    def check_health(self) -> dict[str, bool | None]:
        """Ask every endpoint's health service now; returns ``{endpoint: serving}`` (None: the
        server has no health service) and updates the rotation."""
        return {address: self._check(address) for address in self._pool().addresses}

    def _check(self, address: str) -> bool | None:
        serving: bool | None
        try:
            reply = self._stub(address).health.Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_CHECK_TIMEOUT_S
            )
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError as exc:
            serving = None if exc.code() == grpc.StatusCode.UNIMPLEMENTED else False
        self._pool().set_serving(address, serving is not False)
        return serving

    def _health_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                if self.discovers:
                    self._pool().replace(discover(self._etcd))
                    self._retire_unused()
                self.check_health()
            except Exception as exc:  # etcd down: keep the endpoints we have
                log.debug("sluice health round failed: %r", exc)

    def _retire_unused(self) -> None:
        """Close the channels of schedulers that left the registry once the default deadline
        has passed since (they are draining: calls in flight there may finish)."""
        now = time.monotonic()
        keep = set(self._pool().addresses)
        with self._stubs_lock:
            for address in [a for a in self._stubs if a not in keep]:
                self._retired.append((now, self._stubs.pop(address).channel))
            due = [c for t, c in self._retired if now - t >= self.timeout_s]
            self._retired = [(t, c) for t, c in self._retired if now - t < self.timeout_s]
        for channel in due:
            channel.close()

    def close(self) -> None:
        """Stop the health thread and close every channel."""
        self._stop.set()
        thread, self._health_thread = self._health_thread, None
        if thread is not None:
            thread.join(timeout=HEALTH_CHECK_TIMEOUT_S * 2 + 1)
        with self._stubs_lock:
            stubs, self._stubs = self._stubs, {}
            retired, self._retired = self._retired, []
        for channel in [*(s.channel for s in stubs.values()), *(c for _, c in retired)]:
            channel.close()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- call machinery ------------------------------------------------------------------

    def _unary(
        self,
        method: Callable[[_Stubs], Callable[..., Any]],
        request: Any,
        timeout_s: float,
    ) -> Any:
        self.connect()
        attempts = CallAttempts(self.retry, self._pool(), timeout_s, rng=self._rng)
        metadata = self._metadata()
        while True:
            endpoint = attempts.next_endpoint()
            try:
                return method(self._stub(endpoint))(
                    request, timeout=attempts.remaining_s(), metadata=metadata
                )
            except grpc.RpcError as exc:
                error = from_rpc_error(cast(Any, exc))
                delay = attempts.failed(endpoint, error, received=False)
                if delay is None:
                    raise error from exc
            time.sleep(delay)

    def _stream(
        self,
        method: Callable[[_Stubs], Callable[..., Any]],
        request: Any,
        timeout_s: float,
        request_id: str | None = None,
    ) -> Generator[Any, None, None]:
        self.connect()
        attempts = CallAttempts(self.retry, self._pool(), timeout_s, rng=self._rng)
        metadata = self._metadata(request_id)
        received = False
        while True:
            endpoint = attempts.next_endpoint()
            call = method(self._stub(endpoint))(
                request, timeout=attempts.remaining_s(), metadata=metadata
            )
            try:
                for item in call:
                    received = True
                    yield item
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(cast(Any, exc))
                delay = attempts.failed(endpoint, error, received=received)
                if delay is None:
                    raise error from exc
            finally:
                call.cancel()  # no-op when finished; ends the call when the caller stopped early
            time.sleep(delay)

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
    ) -> Generator[inference_pb2.GenerateChunk, None, None]:
        """An iterator over the chunks of a generation (nothing is sent until it is iterated).

        Retried per the client's policy until the first chunk arrives, never after. Closing
        the iterator early (``break``, ``.close()``) cancels the generation on the server.
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

    def generate_text(self, model: str, prompt: Prompt, **kwargs: Any) -> str:
        """The whole generated text of :meth:`generate` (same keyword arguments)."""
        return "".join(chunk.text for chunk in self.generate(model, prompt, **kwargs))

    def embed(
        self,
        model: str,
        inputs: Sequence[str],
        *,
        workload_class: int = common_pb2.WORKLOAD_CLASS_REALTIME,
        timeout_s: float | None = None,
    ) -> inference_pb2.EmbedResponse:
        """Embed ``inputs``; vectors come back L2-normalised, in input order."""
        reply = self._unary(
            lambda s: s.inference.Embed,
            embed_request(model, inputs, workload_class),
            self._timeout(timeout_s),
        )
        return cast(inference_pb2.EmbedResponse, reply)

    # -- Jobs ----------------------------------------------------------------------------

    def submit_job(
        self,
        spec: jobs_pb2.BatchGenerationSpec | jobs_pb2.FinetuneSpec,
        *,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> jobs_pb2.Job:
        """Submit a job; without ``idempotency_key`` a fresh one makes retries safe."""
        request = submit_job_request(spec, idempotency_key or uuid.uuid4().hex)
        reply = self._unary(lambda s: s.jobs.SubmitJob, request, self._timeout(timeout_s))
        return cast(jobs_pb2.Job, reply)

    def get_job(self, job_id: str, *, timeout_s: float | None = None) -> jobs_pb2.Job:
        """The job's current state."""
        reply = self._unary(
            lambda s: s.jobs.GetJob,
            jobs_pb2.GetJobRequest(job_id=job_id),
            self._timeout(timeout_s),
        )
        return cast(jobs_pb2.Job, reply)

    def watch_job(
        self, job_id: str, *, timeout_s: float | None = None
    ) -> Generator[jobs_pb2.JobEvent, None, None]:
        """An iterator over the job's changes until it ends (retried only before the first)."""
        return self._stream(
            lambda s: s.jobs.WatchJob,
            jobs_pb2.WatchJobRequest(job_id=job_id),
            self._timeout(timeout_s),
        )

    def cancel_job(self, job_id: str, *, timeout_s: float | None = None) -> jobs_pb2.Job:
        """Cancel the job; items already finished are kept."""
        reply = self._unary(
            lambda s: s.jobs.CancelJob,
            jobs_pb2.CancelJobRequest(job_id=job_id),
            self._timeout(timeout_s),
        )
        return cast(jobs_pb2.Job, reply)

    def list_jobs(
        self,
        *,
        state: int | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> jobs_pb2.ListJobsResponse:
        """One page of the tenant's jobs, newest first; pass ``next_page_token`` on."""
        reply = self._unary(
            lambda s: s.jobs.ListJobs,
            list_jobs_request(state, page_size, page_token),
            self._timeout(timeout_s),
        )
        return cast(jobs_pb2.ListJobsResponse, reply)

    # -- Admin ---------------------------------------------------------------------------

    def list_nodes(self, *, timeout_s: float | None = None) -> list[admin_pb2.NodeStatus]:
        """Every node the (next) scheduler knows, with health, circuit and load."""
        reply = self._unary(
            lambda s: s.admin.ListNodes,
            admin_pb2.ListNodesRequest(),
            self._timeout(timeout_s, ADMIN_TIMEOUT_S),
        )
        return list(cast(admin_pb2.ListNodesResponse, reply).nodes)

    def get_tenant_usage(
        self, tenant: str = "", *, timeout_s: float | None = None
    ) -> admin_pb2.TenantUsage:
        """Usage of ``tenant`` (default: the caller's own) as the (next) scheduler counted it."""
        reply = self._unary(
            lambda s: s.admin.GetTenantUsage,
            admin_pb2.GetTenantUsageRequest(tenant=tenant),
            self._timeout(timeout_s, ADMIN_TIMEOUT_S),
        )
        return cast(admin_pb2.TenantUsage, reply)
