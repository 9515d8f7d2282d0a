"""``sluice.v1.Jobs``: thin adapters between gRPC and the jobs store, intake and planner.

A job belongs to the tenant whose key submitted it: any other tenant gets NOT_FOUND for it
(whether it exists is not revealed). A FINETUNE job is checked by
:mod:`scheduler.jobs.finetune_intake`, stored with its examples and driver entry by
:mod:`scheduler.jobs.finetune_store`, and run by :mod:`scheduler.jobs.finetune`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import structlog
from redis.exceptions import RedisError

from scheduler.jobs.finetune import FinetuneRunner
from scheduler.jobs.finetune_store import FinetuneStore
from scheduler.jobs.finetune_submit import FinetuneSubmission
from scheduler.jobs.intake import Header, Intake, check_header
from scheduler.jobs.metrics import JobMetrics
from scheduler.jobs.model import JobRecord, new_job_id
from scheduler.jobs.planner import Backlog, plan
from scheduler.jobs.store import JobStore, UploadExpired, now_ms
from scheduler.jobs.worker import JobWorker
from scheduler.lifecycle import RequestPath, authorize
from scheduler.tenants import Tenant
from sluice.runtime import context
from sluice.runtime.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from sluice.v1 import jobs_pb2, jobs_pb2_grpc

log = structlog.get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

MAX_JOB_ID_CHARS = 64
WATCH_POLL_S = 0.5
MAX_RESULT_IDS = 1000
UPLOAD_LIMIT_S = 600.0
"""A submission must arrive whole within this (well under the store's upload TTL)."""
PAGE_BYTES = 2 * 1024 * 1024
"""Results per page are sized to about this, under a client's 4 MiB receive limit."""
PAGE_SIZES = {"jobs": (50, 500), "results": (500, 5000)}


def _store_errors(method: F) -> F:
    """A Redis error of the jobs store answers UNAVAILABLE (retry in a second), not INTERNAL:
    a Redis restarting or loading its log is an outage, not a bug."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(*args: Any, **kwargs: Any) -> Any:
            try:
                async for item in method(*args, **kwargs):
                    yield item
            except RedisError as exc:
                raise _unavailable(exc) from exc

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except RedisError as exc:
            raise _unavailable(exc) from exc

    return unary  # type: ignore[return-value]


def _unavailable(exc: RedisError) -> Unavailable:
    log.warning("jobs_store_unavailable", error=type(exc).__name__)
    return Unavailable("the jobs store is unavailable", retry_after_s=1.0, reason="JOBS_STORE")


def _page_size(requested: int, kind: str) -> int:
    default, most = PAGE_SIZES[kind]
    if not 0 <= requested <= most:
        raise InvalidArgument([("page_size", f"0-{most}")])
    return requested or default


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    """Submit, read, watch, cancel and list jobs; read their results."""

    def __init__(
        self,
        path: RequestPath,
        store: JobStore,
        worker: JobWorker,
        metrics: JobMetrics,
        finetune: FinetuneRunner | None = None,
        ft: FinetuneStore | None = None,
    ) -> None:
        self._path = path
        self._store = store
        self._worker = worker
        self._metrics = metrics
        self._finetune = finetune
        self._submission = FinetuneSubmission(path, store, ft, metrics) if ft is not None else None

    def _tenant(self) -> Tenant:
        return authorize(self._path.tenants, context.tenant.get())

    async def _owned(self, job_id: str) -> JobRecord:
        if not 0 < len(job_id) <= MAX_JOB_ID_CHARS:
            raise InvalidArgument([("job_id", f"1-{MAX_JOB_ID_CHARS} characters")])
        record = await self._store.get(job_id)
        if record is None or record.tenant != self._tenant().name:
            raise NotFound(f"no job {job_id!r}")
        return record

    @_store_errors
    async def SubmitJob(
        self,
        request_iterator: AsyncIterator[jobs_pb2.SubmitJobRequest],
        ctx: grpc.aio.ServicerContext,
    ) -> jobs_pb2.Job:
        tenant = self._tenant()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument([("header", "send the job's header first")])
        header = check_header(first.header, tenant, self._path.settings.job_default_window_seconds)
        if header.idempotency_key:
            known = await self._store.existing(tenant.name, header.idempotency_key)
            record = await self._store.get(known) if known else None
            if record is not None:
                self._metrics.submitted.labels("duplicate").inc()
                return record.to_proto()
        spec: jobs_pb2.FinetuneSpec | None = None
        if header.kind == jobs_pb2.JOB_KIND_FINETUNE:
            if self._submission is None:
                raise Unavailable("fine-tune jobs are not served here", reason="NO_FINETUNE")
            spec = await self._submission.spec(first.header.finetune, tenant)
        created = now_ms()
        record = JobRecord(
            job_id=new_job_id(),
            tenant=tenant.name,
            kind=header.kind,
            workload_class=int(header.workload_class),
            idempotency_key=header.idempotency_key,
            created_ms=created,
            deadline_ms=created + int(header.window_s * 1000),
            retention_ms=int(tenant.job_retention_seconds * 1000),
            labels=header.labels,
        )
        self._within_tenant_limit(tenant)
        await self._store.begin(record)
        committed: list[bool] = []
        try:
            async with asyncio.timeout(UPLOAD_LIMIT_S):
                if spec is not None and self._submission is not None:
                    accepted = await self._submission.upload(
                        record, spec, header, request_iterator, committed
                    )
                    return self._submitted(accepted)
                return await self._upload(record, tenant, header, request_iterator, committed)
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"the upload took more than {UPLOAD_LIMIT_S:.0f} s; send the lines faster or "
                "split the job"
            ) from exc
        except UploadExpired as exc:
            raise DeadlineExceeded("the upload outlived its record; submit again") from exc
        finally:
            if not committed:  # never delete a job once committed, whatever fails after
                await asyncio.shield(self._store.discard(record.job_id))

    async def _upload(
        self,
        record: JobRecord,
        tenant: Tenant,
        header: Header,
        request_iterator: AsyncIterator[jobs_pb2.SubmitJobRequest],
        committed: list[bool],
    ) -> jobs_pb2.Job:
        settings = self._path.settings
        intake = Intake(
            tenant=tenant,
            catalog=self._path.catalog,
            header=header,
            chars_per_token=settings.chars_per_token,
            prompt_token_weight=settings.prompt_token_weight,
        )
        try:
            async for message in request_iterator:
                if message.WhichOneof("part") != "lines":
                    raise InvalidArgument([("part", "only lines may follow the header")])
                valid, failed = intake.take(message.lines)
                await self._store.add_lines(record.job_id, valid, failed)
            intake.check_complete()
        except InvalidArgument:
            self._metrics.submitted.labels("invalid").inc()
            raise
        record.total = intake.count
        record.work_tokens = intake.work_tokens
        predicted = self._admit(record)
        await self._store.set_fields(
            record.job_id,
            {
                "total": record.total,
                "work_tokens": round(record.work_tokens, 1),
                "predicted_ms": predicted,
                "first_predicted_ms": predicted,
            },
        )
        window_ms = record.deadline_ms - record.created_ms
        job_id = await self._store.commit(record, window_ms + record.retention_ms)
        committed.append(True)
        accepted = await self._store.get(job_id)
        if accepted is None:  # the job its idempotency key named ended meanwhile
            raise Unavailable("the job just ended; submit again", retry_after_s=0.1)
        if job_id == record.job_id:
            self._worker.note(accepted)
        self._metrics.submitted.labels("accepted" if job_id == record.job_id else "duplicate").inc()
        log.info(
            "job_submitted",
            job_id=job_id,
            lines=accepted.total,
            failed_at_submit=accepted.failed,
            window_s=window_ms / 1000,
            predicted_s=(predicted - record.created_ms) / 1000,
        )
        return accepted.to_proto()

    def _submitted(self, accepted: tuple[JobRecord, bool]) -> jobs_pb2.Job:
        """A fine-tune job just committed (or the one its idempotency key named)."""
        record, new = accepted
        if new:
            self._worker.note(record)
            if self._finetune is not None:
                self._finetune.poke(record.job_id)
        return record.to_proto()

    def _within_tenant_limit(self, tenant: Tenant) -> None:
        active = sum(r.tenant == tenant.name for r in self._worker.records.values())
        cap = self._path.settings.job_max_active_per_tenant
        if cap and active >= cap:
            self._metrics.submitted.labels("refused").inc()
            raise ResourceExhausted(
                f"{active} jobs of this tenant are not finished (at most {cap})",
                retry_after_s=30.0,
                reason="TOO_MANY_JOBS",
            )

    def _admit(self, record: JobRecord) -> int:
        """The predicted completion of a job whose window can be met; else the refusal."""
        rate = self._worker.current_rate()
        if rate <= 0:
            raise Unavailable("no node serves jobs now", retry_after_s=2.0, reason="NO_NODE")
        new = Backlog(record.job_id, record.deadline_ms, record.work_tokens)
        now = now_ms()
        verdict = plan(self._worker.backlog(), new, rate, now)
        if verdict.feasible:
            return verdict.predicted_ms
        alone = plan([], new, rate, now)
        if not alone.feasible:  # waiting cannot help: no RetryInfo
            self._metrics.submitted.labels("refused").inc()
            needed = (alone.predicted_ms - now) / 1000
            raise InvalidArgument(
                [
                    (
                        "header.completion_window_seconds",
                        f"the job needs about {needed:.0f} s at {rate:.0f} tokens/s, more "
                        "than its window even with nothing else queued",
                    )
                ],
                reason="JOB_WINDOW_TOO_SHORT",
            )
        self._metrics.submitted.labels("refused").inc()
        late = "it" if verdict.late == (record.job_id,) else f"{len(verdict.late)} jobs"
        raise ResourceExhausted(
            f"the job cannot finish within its window: {late} would be late at "
            f"{rate:.0f} tokens/s; predicted {(verdict.predicted_ms - now_ms()) / 1000:.0f} s",
            retry_after_s=verdict.retry_after_s,
            reason="JOB_WINDOW_INFEASIBLE",
        )

    @_store_errors
    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, ctx: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return (await self._owned(request.job_id)).to_proto()

    @_store_errors
    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, ctx: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        await self._owned(request.job_id)
        state = await self._store.cancel(request.job_id)
        if state == jobs_pb2.JOB_STATE_CANCELLED:
            self._metrics.jobs.labels("cancelled").inc()
        if self._finetune is not None:
            self._finetune.poke(request.job_id)
        log.info("job_cancel_requested", job_id=request.job_id, state=state)
        return (await self._owned(request.job_id)).to_proto()

    @_store_errors
    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobEvent]:
        last: jobs_pb2.Job | None = None
        sample = (asyncio.get_running_loop().time(), -1)
        rate = 0.0
        while True:
            record = await self._owned(request.job_id)
            job = record.to_proto()
            now = asyncio.get_running_loop().time()
            done = record.completed + record.failed
            if sample[1] >= 0 and now > sample[0]:
                rate = 0.5 * rate + 0.5 * (done - sample[1]) / (now - sample[0])
            sample = (now, done)
            if job != last:
                yield jobs_pb2.JobEvent(job=job, lines_per_second=rate)
                last = job
            if record.final:
                return
            await asyncio.sleep(WATCH_POLL_S)

    @_store_errors
    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, ctx: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        size = _page_size(request.page_size, "jobs")
        tenant = self._tenant().name
        position = _list_cursor(request.page_token)
        out: list[jobs_pb2.Job] = []
        exhausted = False
        while len(out) < size and not exhausted:
            ids = await self._store.list_ids(tenant, position, size)
            exhausted = len(ids) < size
            records = await self._store.records([job_id for job_id, _ in ids])
            await self._store.forget(
                tenant, [j for (j, _), r in zip(ids, records, strict=True) if r is None]
            )
            for (job_id, created), record in zip(ids, records, strict=True):
                position = (created, job_id)
                if record is not None and request.state in (0, record.state):
                    out.append(record.to_proto())
                if len(out) == size:
                    exhausted = exhausted and job_id == ids[-1][0]
                    break
        token = "" if exhausted else f"{position[0]}:{position[1]}"
        return jobs_pb2.ListJobsResponse(jobs=out, next_page_token=token)

    @_store_errors
    async def GetJobResults(
        self, request: jobs_pb2.GetJobResultsRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobResultsPage]:
        await self._owned(request.job_id)
        if request.custom_ids:
            if len(request.custom_ids) > MAX_RESULT_IDS:
                raise InvalidArgument([("custom_ids", f"at most {MAX_RESULT_IDS}")])
            found = await self._store.results_of(request.job_id, list(request.custom_ids))
            yield jobs_pb2.JobResultsPage(results=[_result(raw) for raw in found])
            return
        size = _page_size(request.page_size, "results")
        cursor = _results_cursor(request.page_token)
        count = min(size, 100)  # grows or shrinks to keep a page near PAGE_BYTES
        while True:
            cursor, found = await self._store.results_page(request.job_id, cursor, count)
            sizes = sum(len(raw) for raw in found)
            if found:
                per = max(1, sizes // len(found))
                count = max(1, min(size, PAGE_BYTES // per))
            token = str(cursor) if cursor else ""
            yield jobs_pb2.JobResultsPage(
                results=[_result(raw) for raw in found], next_page_token=token
            )
            if not cursor:
                return


def _result(raw: bytes) -> jobs_pb2.JobResult:
    return jobs_pb2.JobResult.FromString(raw)


def _list_cursor(token: str) -> tuple[int, str]:
    if not token:
        return now_ms() + 1, ""
    stamp, _, job_id = token.partition(":")
    with contextlib.suppress(ValueError):
        value = int(stamp)
        if value > 0 and job_id:
            return value, job_id
    raise InvalidArgument([("page_token", "not a token this call returned")])


def _results_cursor(token: str) -> int:
    if not token:
        return 0
    with contextlib.suppress(ValueError):
        value = int(token)
        if value >= 0:
            return value
    raise InvalidArgument([("page_token", "not a token this call returned")])
