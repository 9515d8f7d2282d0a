"""The public calls the jobs benchmark makes, through the raw generated stubs (``Jobs``,
``Inference``) on one TLS channel per scheduler with a tenant's API key: no SDK in between, so
nothing retries or reshapes what the scheduler answered.

``SubmitJob`` is a client stream: the header, then the lines in chunks of at most 1,000.
Refusals are read with ``grpcio-status`` (:func:`refusal_of`): code, ``ErrorInfo.reason`` and the
``RetryInfo`` delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from bench.load.scenario import PlannedRequest
from bench.load.targets import TargetError
from sluice.v1 import common_pb2, inference_pb2, inference_pb2_grpc, jobs_pb2, jobs_pb2_grpc

MODEL = "tiny-random-llama"
CHUNK_LINES = 1000
"""Lines per ``SubmitJob`` message."""
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 64 << 20)]
FINAL_STATES = frozenset(
    {
        jobs_pb2.JOB_STATE_COMPLETED,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_EXPIRED,
    }
)
PROMPT = "once upon a time in a land far away there lived"


def job_lines(count: int, max_new_tokens: int, prefix: str = "line") -> list[jobs_pb2.JobLine]:
    """``count`` generation lines of the tiny model, ``custom_id`` ``<prefix>-<i>``, each a
    unique prompt that generates exactly ``max_new_tokens`` (``ignore_eos``)."""
    return [
        jobs_pb2.JobLine(
            custom_id=f"{prefix}-{i}",
            generate=inference_pb2.GenerateRequest(
                model=MODEL,
                prompt=f"{prefix} {i}: {PROMPT}",
                options=common_pb2.GenerationOptions(
                    max_new_tokens=max_new_tokens, ignore_eos=True
                ),
                cache_bypass=True,
            ),
        )
        for i in range(count)
    ]


@dataclass(frozen=True)
class Refusal:
    """How a call failed."""

    code: str
    """The status code name."""
    reason: str
    """``ErrorInfo.reason`` ("" without one)."""
    retry_after_s: float | None
    """The ``RetryInfo`` delay (None without one)."""
    message: str


def refusal_of(error: grpc.aio.AioRpcError) -> Refusal:
    """The code, reason and ``RetryInfo`` of a failed call."""
    reason, retry = "", None
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry = info.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info_ = error_details_pb2.ErrorInfo()
            detail.Unpack(info_)
            reason = info_.reason
    return Refusal(error.code().name, reason, retry, error.details() or "")


@dataclass(frozen=True)
class Submitted:
    """A submit call: the job when accepted, else the refusal; and how long the call took."""

    elapsed_s: float
    job: jobs_pb2.Job | None = None
    refusal: Refusal | None = None


async def submit_requests(
    header: jobs_pb2.JobHeader, lines: Sequence[jobs_pb2.JobLine], chunk_lines: int = CHUNK_LINES
) -> AsyncIterator[jobs_pb2.SubmitJobRequest]:
    """``SubmitJob``'s client stream: the header, then the lines, ``chunk_lines`` a message."""
    yield jobs_pb2.SubmitJobRequest(header=header)
    for start in range(0, len(lines), chunk_lines):
        chunk = jobs_pb2.JobLines(lines=lines[start : start + chunk_lines])
        yield jobs_pb2.SubmitJobRequest(lines=chunk)


class Caller:
    """One tenant's calls to one scheduler (a TLS channel trusting the suite's CA)."""

    def __init__(
        self, address: str, api_key: str, credentials: grpc.ChannelCredentials | None
    ) -> None:
        self.address = address
        self.channel = (
            grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
            if credentials is None
            else grpc.aio.secure_channel(address, credentials, options=GRPC_OPTIONS)
        )
        self.jobs = jobs_pb2_grpc.JobsStub(self.channel)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def warm(self) -> None:
        """One cheap call, so that a timed call finds the channel connected (TLS done)."""
        await self.jobs.ListJobs(
            jobs_pb2.ListJobsRequest(page_size=1), metadata=self.metadata, timeout=10
        )

    async def submit(
        self,
        lines: Sequence[jobs_pb2.JobLine],
        *,
        window_s: int,
        key: str = "",
        timeout_s: float = 60.0,
    ) -> Submitted:
        """Submit a BATCH job; times the whole call (the stream sent and the answer read)."""
        header = jobs_pb2.JobHeader(
            idempotency_key=key, completion_window_seconds=window_s, line_count=len(lines)
        )
        started = time.perf_counter()
        try:
            job = await self.jobs.SubmitJob(
                submit_requests(header, lines), metadata=self.metadata, timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return Submitted(time.perf_counter() - started, refusal=refusal_of(exc))
        return Submitted(time.perf_counter() - started, job=job)

    async def get(self, job_id: str, timeout_s: float = 5.0) -> jobs_pb2.Job:
        """The job now."""
        request = jobs_pb2.GetJobRequest(job_id=job_id)
        job: jobs_pb2.Job = await self.jobs.GetJob(
            request, metadata=self.metadata, timeout=timeout_s
        )
        return job

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        """Cancel the job."""
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        job: jobs_pb2.Job = await self.jobs.CancelJob(request, metadata=self.metadata, timeout=10)
        return job

    async def wait_final(
        self, job_id: str, timeout_s: float, poll_s: float = 0.25
    ) -> jobs_pb2.Job | None:
        """Poll until the job is final; failed polls (a store restarting) are retried.
        None when it was not final within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                job = await self.get(job_id)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(poll_s)
                continue
            if job.state in FINAL_STATES:
                return job
            await asyncio.sleep(poll_s)
        return None

    async def results(self, job_id: str, page_size: int = 1000) -> list[jobs_pb2.JobResult]:
        """Every result of the job, page by page (as the server streams them)."""
        request = jobs_pb2.GetJobResultsRequest(job_id=job_id, page_size=page_size)
        out: list[jobs_pb2.JobResult] = []
        async for page in self.jobs.GetJobResults(request, metadata=self.metadata, timeout=60):
            out.extend(page.results)
        return out

    async def results_of(
        self, job_id: str, custom_ids: Sequence[str], batch: int = 1000
    ) -> list[jobs_pb2.JobResult]:
        """The results of these lines, asked for by ``custom_id`` (1,000 a call)."""
        out: list[jobs_pb2.JobResult] = []
        for start in range(0, len(custom_ids), batch):
            request = jobs_pb2.GetJobResultsRequest(
                job_id=job_id, custom_ids=custom_ids[start : start + batch]
            )
            async for page in self.jobs.GetJobResults(request, metadata=self.metadata, timeout=60):
                out.extend(page.results)
        return out


class RealtimeTarget:
    """A :class:`bench.load.targets.Target` on the raw ``Inference`` stub for ``model`` that
    also keeps every chunk's arrival time and token count per request."""

    name = "sluice"

    def __init__(self, caller: Caller, model: str = MODEL) -> None:
        self.caller = caller
        self.model = model
        self.chunks: dict[int, list[tuple[float, int]]] = {}

    async def generate(self, request: PlannedRequest) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """One streamed REALTIME generation; failures as ``TargetError``."""
        message = inference_pb2.GenerateRequest(
            model=self.model,
            prompt=request.prompt,
            options=common_pb2.GenerationOptions(
                max_new_tokens=request.max_new_tokens, ignore_eos=True
            ),
            workload_class=common_pb2.WORKLOAD_CLASS_REALTIME,
            cache_bypass=True,
        )
        seen = self.chunks.setdefault(request.index, [])
        call = self.caller.inference.Generate(
            message, metadata=self.caller.metadata, timeout=request.timeout_s
        )
        try:
            async for chunk in call:
                seen.append((time.perf_counter(), len(chunk.token_ids)))
                yield chunk
        except grpc.aio.AioRpcError as exc:
            r = refusal_of(exc)
            raise TargetError(
                r.code, r.message, reason=r.reason, retry_after_s=r.retry_after_s
            ) from exc

    async def embed(self, request: PlannedRequest) -> int:
        """Always ``UNIMPLEMENTED``: this target measures generation streams only."""
        raise TargetError("UNIMPLEMENTED", "RealtimeTarget serves generation only")

    async def close(self) -> None:
        """The caller is closed by its owner."""


@contextlib.asynccontextmanager
async def closed_loop(
    caller: Caller, model: str, prompt: str, streams: int, max_new_tokens: int
) -> AsyncIterator[list[str]]:
    """``streams`` BATCH generations of ``model`` (``max_new_tokens`` each, ``ignore_eos``)
    while the block runs, each followed at once by the next (``saturate <stream> #<n>:
    <prompt>``; 0.2 s after a failed one); yields the failed calls' code names, filled in as
    they fail. The streams are cancelled, and waited for, when the block ends."""
    options = common_pb2.GenerationOptions(max_new_tokens=max_new_tokens, ignore_eos=True)
    failures: list[str] = []

    async def loop(worker: int) -> None:
        n = 0
        while True:
            n += 1
            message = inference_pb2.GenerateRequest(
                model=model,
                prompt=f"saturate {worker} #{n}: {prompt}",
                options=options,
                workload_class=common_pb2.WORKLOAD_CLASS_BATCH,
                cache_bypass=True,
            )
            try:
                async for _ in caller.inference.Generate(
                    message, metadata=caller.metadata, timeout=60
                ):
                    pass
            except grpc.aio.AioRpcError as exc:
                failures.append(exc.code().name)
                await asyncio.sleep(0.2)

    tasks = [asyncio.create_task(loop(w)) for w in range(streams)]
    try:
        yield failures
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
