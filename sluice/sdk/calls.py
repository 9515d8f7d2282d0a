"""Every call of the public API, described once: :class:`Api`.

A method of :class:`Api` turns plain Python arguments into a :class:`Call` (which RPC, which
request, which deadline, how the reply becomes the value returned) and hands it to the
transport. :class:`~sluice.sdk.aio.AsyncClient` and :class:`~sluice.sdk.sync.Client` are the
two transports: they implement :meth:`Api._unary`, :meth:`Api._stream` and :meth:`Api._text`,
and fix the return types through :class:`Api`'s type parameters (``Awaitable[Job]`` and
``AsyncIterator[GenerateChunk]`` for one, ``Job`` and ``Iterator[GenerateChunk]`` for the
other), so both have the same surface with exact types.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from google.protobuf.message import Message

from sluice.contract import WorkloadClass
from sluice.sdk.base import ADMIN_TIMEOUT_S, ClientBase
from sluice.sdk.requests import (
    Prompt,
    embed_request,
    generate_request,
    generation_options,
    list_jobs_request,
    submit_job_request,
)
from sluice.v1 import admin_pb2, jobs_pb2

Chunks = TypeVar("Chunks")
Text = TypeVar("Text")
Embedding = TypeVar("Embedding")
JobT = TypeVar("JobT")
Events = TypeVar("Events")
JobPage = TypeVar("JobPage")
Nodes = TypeVar("Nodes")
Usage = TypeVar("Usage")


class Service(enum.Enum):
    """The public services, by their attribute on :class:`~sluice.sdk.base.Stubs`."""

    INFERENCE = "inference"
    JOBS = "jobs"
    ADMIN = "admin"


def _same(reply: Any) -> Any:
    return reply


@dataclass(frozen=True, slots=True)
class Call:
    """One logical call: an RPC with its request, retried by the transport as a whole."""

    service: Service
    method: str
    """The RPC's name in its service, e.g. ``"Generate"``."""
    request: Message
    timeout_s: float
    """Deadline of the whole call, retries and a whole stream included."""
    request_id: str | None = None
    """Sent as ``x-request-id`` on every attempt (a fresh one when None)."""
    result: Callable[[Any], Any] = _same
    """Turns a unary reply into the value the method returns."""


class Api(ClientBase, Generic[Chunks, Text, Embedding, JobT, Events, JobPage, Nodes, Usage]):
    """The SDK's calls; a transport subclass supplies the I/O and binds the return types.

    Streams are retried per the client's policy until the first item arrives, never after;
    unary calls until they succeed or the policy gives up.
    """

    def _unary(self, call: Call) -> Any:
        raise NotImplementedError

    def _stream(self, call: Call) -> Any:
        raise NotImplementedError

    def _text(self, chunks: Any) -> Any:
        """The text of a stream of :meth:`generate`, joined."""
        raise NotImplementedError

    def _call(
        self,
        service: Service,
        method: str,
        request: Message,
        timeout_s: float | None,
        cap_s: float | None = None,
        **rest: Any,
    ) -> Call:
        return Call(service, method, request, self._timeout(timeout_s, cap_s), **rest)

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
        workload_class: WorkloadClass = WorkloadClass.REALTIME,
        cache_bypass: bool = False,
        timeout_s: float | None = None,
        ignore_eos: bool = False,
        session_id: str = "",
        request_id: str | None = None,
    ) -> Chunks:
        """Stream a generation. ``prompt`` is raw text or chat ``(role, content)`` pairs.

        Nothing is sent until the stream is iterated. Refusals and unreachable schedulers are
        retried per the client's policy until the first chunk arrives, never after: a failure
        mid-stream raises. Closing the stream early cancels the generation on the server.
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
        call = self._call(Service.INFERENCE, "Generate", request, timeout_s, request_id=request_id)
        return cast(Chunks, self._stream(call))

    def generate_text(self, model: str, prompt: Prompt, **kwargs: Any) -> Text:
        """The whole generated text of :meth:`generate` (same keyword arguments)."""
        chunks = self.generate(model, prompt, **kwargs)
        return cast(Text, self._text(chunks))

    def embed(
        self,
        model: str,
        inputs: Sequence[str],
        *,
        workload_class: WorkloadClass = WorkloadClass.REALTIME,
        timeout_s: float | None = None,
    ) -> Embedding:
        """Embed ``inputs``; vectors come back L2-normalised, in input order."""
        request = embed_request(model, inputs, workload_class)
        return cast(
            Embedding, self._unary(self._call(Service.INFERENCE, "Embed", request, timeout_s))
        )

    # -- Jobs ----------------------------------------------------------------------------

    def submit_job(
        self,
        spec: jobs_pb2.BatchGenerationSpec | jobs_pb2.FinetuneSpec,
        *,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> JobT:
        """Submit a job (build a batch with :func:`sluice.batch_job`); returns at once.

        Without ``idempotency_key`` a fresh one is made, so a retried submit cannot create
        the job twice.
        """
        request = submit_job_request(spec, idempotency_key or uuid.uuid4().hex)
        return cast(JobT, self._unary(self._call(Service.JOBS, "SubmitJob", request, timeout_s)))

    def get_job(self, job_id: str, *, timeout_s: float | None = None) -> JobT:
        """The job's current state."""
        request = jobs_pb2.GetJobRequest(job_id=job_id)
        return cast(JobT, self._unary(self._call(Service.JOBS, "GetJob", request, timeout_s)))

    def watch_job(self, job_id: str, *, timeout_s: float | None = None) -> Events:
        """Stream the job's changes until it ends (retried only before the first event)."""
        request = jobs_pb2.WatchJobRequest(job_id=job_id)
        return cast(Events, self._stream(self._call(Service.JOBS, "WatchJob", request, timeout_s)))

    def cancel_job(self, job_id: str, *, timeout_s: float | None = None) -> JobT:
        """Cancel the job; items already finished are kept."""
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        return cast(JobT, self._unary(self._call(Service.JOBS, "CancelJob", request, timeout_s)))

    def list_jobs(
        self,
        *,
        state: int | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> JobPage:
        """One page of the tenant's jobs, newest first; pass ``next_page_token`` on."""
        request = list_jobs_request(state, page_size, page_token)
        return cast(JobPage, self._unary(self._call(Service.JOBS, "ListJobs", request, timeout_s)))

    # -- Admin ---------------------------------------------------------------------------

    def list_nodes(self, *, timeout_s: float | None = None) -> Nodes:
        """Every node the (next) scheduler knows, with health, circuit and load."""
        call = self._call(
            Service.ADMIN,
            "ListNodes",
            admin_pb2.ListNodesRequest(),
            timeout_s,
            ADMIN_TIMEOUT_S,
            result=lambda reply: list(reply.nodes),
        )
        return cast(Nodes, self._unary(call))

    def get_tenant_usage(self, tenant: str = "", *, timeout_s: float | None = None) -> Usage:
        """Usage of ``tenant`` (default: the caller's own) as the (next) scheduler counted it."""
        request = admin_pb2.GetTenantUsageRequest(tenant=tenant)
        call = self._call(Service.ADMIN, "GetTenantUsage", request, timeout_s, ADMIN_TIMEOUT_S)
        return cast(Usage, self._unary(call))
