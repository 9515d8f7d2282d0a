"""Every call of the public API, described once: :class:`Api`.

A method of :class:`Api` turns plain Python arguments into a :class:`Call` (which RPC, which
request, which deadline, how the reply becomes the value returned) and hands it to the
transport. :class:`~sluice.sdk.aio.AsyncClient` and :class:`~sluice.sdk.sync.Client` are the
two transports: they implement :meth:`Api._unary`, :meth:`Api._stream`, :meth:`Api._pages`
and :meth:`Api._text`,
and fix the return types through :class:`Api`'s type parameters (``Awaitable[Job]`` and
``AsyncIterator[GenerateChunk]`` for one, ``Job`` and ``Iterator[GenerateChunk]`` for the
other), so both have the same surface with exact types.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar, Unpack, cast

from google.protobuf.message import Message

from sluice.contract import WorkloadClass
from sluice.sdk.base import ADMIN_TIMEOUT_S, ClientBase
from sluice.sdk.finetune_lines import (
    FinetuneSettings,
    TrainingLineInput,
    finetune_spec,
    parse_training_lines,
)
from sluice.sdk.job_lines import MAX_CHUNK_LINES, JobLineInput, parse_job_lines
from sluice.sdk.requests import (
    Prompt,
    embed_request,
    generate_request,
    generation_options,
    is_last_page,
    list_jobs_request,
    next_page,
    submit_finetune_requests,
    submit_job_requests,
)
from sluice.v1 import admin_pb2, jobs_pb2

Chunks = TypeVar("Chunks")
Text = TypeVar("Text")
Embedding = TypeVar("Embedding")
JobT = TypeVar("JobT")
Events = TypeVar("Events")
JobList = TypeVar("JobList")
Results = TypeVar("Results")
Nodes = TypeVar("Nodes")
Usage = TypeVar("Usage")


class Service(enum.Enum):
    """The public services, by their attribute on :class:`~sluice.sdk.base.Stubs`."""

    INFERENCE = "inference"
    JOBS = "jobs"
    ADMIN = "admin"


FINAL_JOB_STATES = frozenset(
    {
        jobs_pb2.JOB_STATE_COMPLETED,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_EXPIRED,
    }
)
"""The states a job never leaves."""


def _same(reply: Any) -> Any:
    return reply


def _alone(message: Any) -> tuple[Any]:
    return (message,)


def _never(message: Any) -> bool:
    return False


def _same_request(request: Message, message: Any) -> Message:
    return request


def _final_event(event: jobs_pb2.JobEvent) -> bool:
    return event.job.state in FINAL_JOB_STATES


def _jobs_of(page: jobs_pb2.ListJobsResponse) -> Iterable[jobs_pb2.Job]:
    return page.jobs


def _results_of(page: jobs_pb2.JobResultsPage) -> Iterable[jobs_pb2.JobResult]:
    return page.results


@dataclass(frozen=True, slots=True)
class Call:
    """One logical call: an RPC with its request, retried by the transport as a whole."""

    service: Service
    method: str
    """The RPC's name in its service, e.g. ``"Generate"``."""
    request: Message | Sequence[Message]
    """The request; a sequence for a client stream (sent anew on every attempt)."""
    timeout_s: float
    """Deadline of the whole call, retries and a whole stream included (``math.inf``: none)."""
    request_id: str | None = None
    """Sent as ``x-request-id`` on every attempt (a fresh one when None)."""
    result: Callable[[Any], Any] = _same
    """Turns a unary reply into the value the method returns."""
    items: Callable[[Any], Iterable[Any]] = _alone
    """The values a stream's message (or a page) holds for the caller."""
    resume: Callable[[Any, Any], Message] | None = None
    """For a stream that can be resumed, or pages: the request that continues after a
    message, from the request that got it. A resumable stream cut off after messages arrived
    is re-opened with it (see :class:`~sluice.sdk.base.Attempt`)."""
    last: Callable[[Any], bool] = _never
    """True for a stream's last message (or the last page): nothing is read after it."""

    def after(self, message: Any) -> Call:
        """This call, continued after ``message`` (a page); needs :attr:`resume`."""
        if self.resume is None:
            raise ValueError(f"{self.method} cannot be continued")
        return replace(self, request=self.resume(self.request, message))


class Api(
    ClientBase,
    Generic[Chunks, Text, Embedding, JobT, Events, JobList, Results, Nodes, Usage],
):
    """The SDK's calls; a transport subclass supplies the I/O and binds the return types.

    Streams are retried per the client's policy until the first item arrives, never after;
    unary calls until they succeed or the policy gives up.
    """

    def _unary(self, call: Call) -> Any:
        raise NotImplementedError

    def _stream(self, call: Call) -> Any:
        raise NotImplementedError

    def _pages(self, call: Call) -> Any:
        """The items of a paginated unary call: one call per page, as iteration goes."""
        raise NotImplementedError

    def _text(self, chunks: Any) -> Any:
        """The text of a stream of :meth:`generate`, joined."""
        raise NotImplementedError

    def _call(
        self,
        service: Service,
        method: str,
        request: Message | Sequence[Message],
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
        lines: Iterable[JobLineInput],
        *,
        idempotency_key: str | None = None,
        completion_window_s: float | None = None,
        workload_class: WorkloadClass = WorkloadClass.BATCH,
        labels: Mapping[str, str] | None = None,
        chunk_lines: int = MAX_CHUNK_LINES,
        timeout_s: float | None = None,
    ) -> JobT:
        """Submit a batch job; returns it once the scheduler stored it (with its predicted
        completion), or raises the refusal (``ResourceExhaustedError`` with ``retry_after_s``
        when its window cannot be met, ``InvalidRequestError`` over the limits).

        ``lines``: ``JobLine`` messages (:func:`~sluice.sdk.requests.generate_line`,
        :func:`~sluice.sdk.requests.embed_line`), dicts, or JSON texts (an open JSONL file) in
        Sluice's or OpenAI's batch format (:mod:`sluice.sdk.job_lines`). They are all read
        first, in the calling thread: if any is malformed, :class:`~sluice.sdk.job_lines.
        JobLinesError` lists every problem with its line number, and nothing is sent. They go
        as a stream, a header then chunks of ``chunk_lines`` (and at most 4 MiB).

        ``idempotency_key``: a second submit with the same key returns the first job. Without
        one a fresh key is made, so the SDK's own retries cannot create the job twice.
        ``completion_window_s``: the job must finish within it (None: 24 hours).
        ``timeout_s``: deadline of the upload and the answer, retries included.
        """
        requests = submit_job_requests(
            parse_job_lines(lines).check(),
            idempotency_key=idempotency_key or f"sdk-{uuid.uuid4().hex}",
            completion_window_s=completion_window_s,
            workload_class=workload_class,
            labels=labels,
            chunk_lines=chunk_lines,
        )
        call = self._call(Service.JOBS, "SubmitJob", requests, timeout_s)
        return cast(JobT, self._unary(call))

    def submit_finetune(
        self,
        examples: Iterable[TrainingLineInput],
        *,
        base_model: str,
        adapter_name: str,
        idempotency_key: str | None = None,
        completion_window_s: float | None = None,
        labels: Mapping[str, str] | None = None,
        chunk_lines: int = MAX_CHUNK_LINES,
        timeout_s: float | None = None,
        **settings: Unpack[FinetuneSettings],
    ) -> JobT:
        """Submit a LoRA fine-tune of ``base_model`` on ``examples``; once trained, its adapter
        is served as ``"<base_model>:<adapter_name>"`` (to this tenant only unless
        ``shared=True``). Returns the job once stored (QUEUED), or raises the refusal
        (``InvalidRequestError`` for a bad setting or example, ``AlreadyExistsError`` when the
        tenant already has that adapter name or a fine-tune making it).

        ``examples``: an open JSONL file in OpenAI's fine-tuning format (``prompt`` and
        ``completion``, or ``messages``), dicts, or messages
        (:mod:`sluice.sdk.finetune_lines`). All are read first: if any is malformed,
        :class:`~sluice.sdk.job_lines.JobLinesError` lists every problem and nothing is sent.
        ``settings``: ``rank``, ``alpha``, ``dropout``, ``target_modules``,
        ``learning_rate``, ``weight_decay``, ``schedule`` ("constant", "linear", "cosine"),
        ``warmup_steps``, ``max_grad_norm``, ``epochs``, ``max_steps``, ``micro_batch_size``,
        ``gradient_accumulation_steps``, ``seed``, ``max_sequence_tokens``,
        ``checkpoint_every_steps``, ``shared`` (unset: the server's defaults).

        Follow it with :meth:`watch_job` (``event.job.training``: step, loss, learning rate,
        tokens/s, time waiting for gaps, ETA); its results are its steps
        (:func:`~sluice.sdk.finetune_lines.loss_curve`).
        """
        spec = finetune_spec(base_model, adapter_name, **settings)
        requests = submit_finetune_requests(
            parse_training_lines(examples).check(),
            spec,
            idempotency_key=idempotency_key or f"sdk-{uuid.uuid4().hex}",
            completion_window_s=completion_window_s,
            labels=labels,
            chunk_lines=chunk_lines,
        )
        call = self._call(Service.JOBS, "SubmitJob", requests, timeout_s)
        return cast(JobT, self._unary(call))

    def get_job(self, job_id: str, *, timeout_s: float | None = None) -> JobT:
        """The job's current state: counts, timestamps, predicted completion."""
        request = jobs_pb2.GetJobRequest(job_id=job_id)
        return cast(JobT, self._unary(self._call(Service.JOBS, "GetJob", request, timeout_s)))

    def watch_job(self, job_id: str, *, timeout_s: float | None = None) -> Events:
        """Iterate the job's progress (``JobEvent``: the job after each change, and its rate)
        until an event with a final state (:data:`FINAL_JOB_STATES`), which is the last (a
        stream the server ends before that ends the iteration too).

        A watch cut off (``UNAVAILABLE``: the scheduler restarted, the connection dropped) is
        re-opened, on another scheduler when there is one, per the client's retry policy, its
        budget renewed by every event received. ``timeout_s`` bounds the whole watch (None:
        no bound, a job may take its whole window).
        """
        request = jobs_pb2.WatchJobRequest(job_id=job_id)
        deadline_s = math.inf if timeout_s is None else timeout_s
        call = self._call(
            Service.JOBS, "WatchJob", request, deadline_s, resume=_same_request, last=_final_event
        )
        return cast(Events, self._stream(call))

    def cancel_job(self, job_id: str, *, timeout_s: float | None = None) -> JobT:
        """Cancel the job: no new line starts, lines in flight finish, results so far are
        kept. Returns the job (``CANCELLING`` until the lines in flight finish)."""
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        return cast(JobT, self._unary(self._call(Service.JOBS, "CancelJob", request, timeout_s)))

    def list_jobs(
        self,
        *,
        state: int | None = None,
        page_size: int = 0,
        timeout_s: float | None = None,
    ) -> JobList:
        """Iterate the tenant's jobs, newest first (``state``: only those in this
        ``JobState``). Pages of ``page_size`` jobs (0: the server's 50) are fetched as the
        iteration needs them, each a call of its own with ``timeout_s``; stop iterating to
        stop fetching."""
        request = list_jobs_request(state, page_size, "")
        call = self._call(
            Service.JOBS,
            "ListJobs",
            request,
            timeout_s,
            items=_jobs_of,
            resume=next_page,
            last=is_last_page,
        )
        return cast(JobList, self._pages(call))

    def job_results(
        self,
        job_id: str,
        custom_ids: Sequence[str] | None = None,
        *,
        page_size: int = 0,
        timeout_s: float | None = None,
    ) -> Results:
        """Iterate the job's results (``JobResult``: a line's answer or its error), page by
        page in line order, or only those of ``custom_ids`` (at most 1000). Any time: a
        running job has the results of the lines finished so far.

        The stream is resumed after the last page received when it is cut off, so every
        result arrives once. ``timeout_s`` bounds the whole download (default: the client's).
        """
        if isinstance(custom_ids, str):
            custom_ids = [custom_ids]
        request = jobs_pb2.GetJobResultsRequest(
            job_id=job_id, custom_ids=list(custom_ids or ()), page_size=page_size
        )
        call = self._call(
            Service.JOBS,
            "GetJobResults",
            request,
            timeout_s,
            items=_results_of,
            resume=next_page,
            last=is_last_page,
        )
        return cast(Results, self._stream(call))

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
