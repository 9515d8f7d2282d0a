"""The public calls the jobs benchmark makes, through the raw generated stubs (``Jobs``,
``Inference``) on one TLS channel per scheduler with a tenant's API key: no SDK in between, so
nothing retries or reshapes what the scheduler answered.

``SubmitJob`` is a client stream: the header, then the lines in chunks of at most 1,000.
Refusals are read with ``grpcio-status`` (:func:`refusal_of`): code, ``ErrorInfo.reason`` and the
``RetryInfo`` delay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

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


async def _parts(
    header: jobs_pb2.JobHeader, lines: Sequence[jobs_pb2.JobLine]
) -> AsyncIterator[jobs_pb2.SubmitJobRequest]:
    yield jobs_pb2.SubmitJobRequest(header=header)
    for start in range(0, len(lines), CHUNK_LINES):
        chunk = jobs_pb2.JobLines(lines=lines[start : start + CHUNK_LINES])
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
                _parts(header, lines), metadata=self.metadata, timeout=timeout_s
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
