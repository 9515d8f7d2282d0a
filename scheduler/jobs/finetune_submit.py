"""A fine-tune job's submission, between the Jobs servicer and the store: the spec checked and
the adapter name free, then every example valid or the job refused whole, then committed with
its name claimed and its driver entry queued (:mod:`scheduler.jobs.finetune_store`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog

from scheduler.jobs.finetune_intake import AdapterExists, TrainIntake, check_spec
from scheduler.jobs.finetune_store import AdapterNameTaken, FinetuneStore
from scheduler.jobs.intake import Header
from scheduler.jobs.metrics import JobMetrics
from scheduler.jobs.model import JobRecord
from scheduler.jobs.store import JobStore
from scheduler.lifecycle import RequestPath
from scheduler.tenants import Tenant
from sluice.runtime.errors import InvalidArgument, Unavailable
from sluice.v1 import jobs_pb2

log = structlog.get_logger(__name__)


class FinetuneSubmission:
    """Checks and stores fine-tune jobs for :class:`~scheduler.jobs.service.JobsServicer`."""

    def __init__(
        self, path: RequestPath, store: JobStore, ft: FinetuneStore, metrics: JobMetrics
    ) -> None:
        self._path = path
        self._store = store
        self._ft = ft
        self._metrics = metrics

    def _known(self, model: str) -> bool:
        found = self._path.catalog(model)
        return found is not None and found.kind == "generate"

    async def spec(self, spec: jobs_pb2.FinetuneSpec, tenant: Tenant) -> jobs_pb2.FinetuneSpec:
        """The checked spec, defaults filled in; ALREADY_EXISTS when the tenant has an adapter
        of that name (any base model) or a live fine-tune job making one."""
        try:
            checked = check_spec(spec, tenant, self._known)
        except InvalidArgument:
            self._metrics.submitted.labels("invalid").inc()
            raise
        name = checked.adapter_name
        adapters = self._path.adapters.records() if self._path.adapters else []
        for adapter in adapters:
            if adapter.tenant == tenant.name and adapter.name == name:
                self._metrics.submitted.labels("invalid").inc()
                raise AdapterExists(
                    f"adapter {name!r} already exists ({adapter.served_as}): choose another name"
                )
        holder = await self._ft.claim_holder(tenant.name, name)
        if holder is not None:
            self._metrics.submitted.labels("invalid").inc()
            raise AdapterExists(f"adapter {name!r} is being trained by job {holder}")
        return checked

    async def upload(
        self,
        record: JobRecord,
        spec: jobs_pb2.FinetuneSpec,
        header: Header,
        request_iterator: AsyncIterator[jobs_pb2.SubmitJobRequest],
        committed: list[bool],
    ) -> tuple[JobRecord, bool]:
        """Read the examples and commit the job; returns the job accepted and whether it is
        this upload (False: the job its idempotency key already named)."""
        intake = TrainIntake(header.line_count, self._path.settings.chars_per_token)
        try:
            async for message in request_iterator:
                if message.WhichOneof("part") != "lines":
                    raise InvalidArgument([("part", "only lines may follow the header")])
                valid = intake.take(message.lines)
                if not intake.bad_lines:  # once one is bad, nothing more is stored
                    await self._store.add_lines(record.job_id, valid, [])
            steps = intake.check_complete(spec)
        except InvalidArgument:
            self._metrics.submitted.labels("invalid").inc()
            raise
        await self._ft.save_spec(record.job_id, spec)
        await self._store.set_fields(
            record.job_id,
            {
                "total": intake.count,
                "work_tokens": round(intake.work_tokens, 1),
                "train_total": steps,
            },
        )
        keep_ms = record.deadline_ms - record.created_ms + record.retention_ms
        try:
            job_id = await self._ft.commit(record, spec.adapter_name, keep_ms, keep_ms)
        except AdapterNameTaken as exc:
            self._metrics.submitted.labels("invalid").inc()
            raise AdapterExists(
                f"adapter {spec.adapter_name!r} is being trained by job {exc.holder}"
            ) from exc
        committed.append(True)
        new = job_id == record.job_id
        if not new:
            await self._store.discard(record.job_id)
        accepted = await self._store.get(job_id)
        if accepted is None:  # the job its idempotency key named ended meanwhile
            raise Unavailable("the job just ended; submit again", retry_after_s=0.1)
        self._metrics.submitted.labels("accepted" if new else "duplicate").inc()
        log.info(
            "finetune_submitted",
            job_id=job_id,
            examples=accepted.total,
            steps=steps,
            base_model=spec.base_model,
            adapter=spec.adapter_name,
            new=new,
        )
        return accepted, new
