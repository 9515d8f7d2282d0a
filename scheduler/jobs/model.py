"""A job as stored in Redis: its keys, its record, and how it reads as a ``sluice.v1.Job``.

Every key of one job carries the job id as a hash tag (``{job-…}``), so a job's scripts touch
one Redis Cluster slot. The job's hash holds its state and counters; its stream holds the lines
not yet settled; its results hash maps ``custom_id`` to a serialized ``JobResult``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field

from sluice.v1 import common_pb2, jobs_pb2

PREFIX = "sluice:jobs:v1"
GROUP = "workers"
"""The one consumer group of every job's stream: each scheduler replica is a consumer."""
ACTIVE_KEY = f"{PREFIX}:active"
"""Sorted set of jobs with lines to run, scored by deadline (ms)."""
THROUGHPUT_KEY = f"{PREFIX}:throughput"
"""Hash: ``tokens`` (estimated work of every settled line, all jobs) and ``at_ms``, for the
cluster-wide rate that predictions use."""

FINAL_STATES = frozenset(
    {
        jobs_pb2.JOB_STATE_COMPLETED,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_EXPIRED,
    }
)
RUNNABLE_STATES = frozenset({jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING})


def new_job_id() -> str:
    """An unguessable job id (128 random bits)."""
    return "job-" + secrets.token_urlsafe(16)


@dataclass(frozen=True)
class JobKeys:
    """The Redis keys of one job."""

    job_id: str

    @property
    def job(self) -> str:
        """Hash: the record."""
        return f"{PREFIX}:job:{{{self.job_id}}}"

    @property
    def lines(self) -> str:
        """Stream: lines not yet settled."""
        return f"{PREFIX}:lines:{{{self.job_id}}}"

    @property
    def results(self) -> str:
        """Hash: custom_id → serialized JobResult."""
        return f"{PREFIX}:results:{{{self.job_id}}}"

    @property
    def nodes(self) -> str:
        """Hash: entry id → the node generating that line (for a replica that takes the line
        over to attach to the generation instead of starting it again); its own TTL."""
        return f"{PREFIX}:nodes:{{{self.job_id}}}"

    def all(self) -> list[str]:
        """Every key of the job."""
        return [self.job, self.lines, self.results, self.nodes]


def tenant_jobs_key(tenant: str) -> str:
    """Sorted set of a tenant's job ids scored by creation time (ms)."""
    return f"{PREFIX}:tenant:{_digest(tenant)}"


def idempotency_key(tenant: str, key: str) -> str:
    """The key holding the job id a tenant's idempotency key names."""
    return f"{PREFIX}:idem:{_digest(tenant + chr(0) + key)}"


def adapter_claim_key(tenant: str, adapter_name: str) -> str:
    """The key holding the id of the fine-tune job that claimed a tenant's adapter name."""
    return f"{PREFIX}:adapter:{_digest(tenant + chr(0) + adapter_name)}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class JobRecord:
    """The fields of a job's hash, typed."""

    job_id: str
    tenant: str
    state: int = jobs_pb2.JOB_STATE_QUEUED
    kind: int = jobs_pb2.JOB_KIND_BATCH
    workload_class: int = common_pb2.WORKLOAD_CLASS_BATCH
    idempotency_key: str = ""
    created_ms: int = 0
    started_ms: int = 0
    finished_ms: int = 0
    deadline_ms: int = 0
    predicted_ms: int = 0
    first_predicted_ms: int = 0
    """The prediction made at submission (``predicted_ms`` is updated as the job runs)."""
    expires_ms: int = 0
    retention_ms: int = 0
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    dead_lettered: int = 0
    error: str = ""
    work_tokens: float = 0.0
    """Estimated work of every line (prompt tokens weighted, plus max new tokens)."""
    settled_tokens: float = 0.0
    """Estimated work of the lines settled so far."""
    labels: dict[str, str] = field(default_factory=dict)
    # A fine-tune job's progress (kind FINETUNE), as its driver last recorded it.
    train_step: int = 0
    train_total: int = 0
    train_loss: float = 0.0
    train_lr: float = 0.0
    train_tokens_per_s: float = 0.0
    train_waiting_s: float = 0.0
    train_eta_ms: int = 0
    train_node: str = ""
    """The node training it now ("" while it waits for one)."""
    train_seen_ms: int = 0
    """When its driver last heard from that node (an event, or the start of the call)."""
    checkpoint_step: int = 0
    adapter: str = ""
    """``"<base_model>:<adapter_name>"`` once registered."""

    @property
    def final(self) -> bool:
        """Whether the job reached a final state."""
        return self.state in FINAL_STATES

    @property
    def remaining_tokens(self) -> float:
        """Estimated work of the lines not settled yet."""
        return max(0.0, self.work_tokens - self.settled_tokens)

    def to_hash(self) -> dict[str, str]:
        """The Redis hash fields."""
        out = {k: str(v) for k, v in self.__dict__.items() if k != "labels"}
        out["labels"] = json.dumps(self.labels, sort_keys=True)
        return out

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        """A record from a job's hash (as redis-py returns it)."""
        # A line's last error (``err:<entry>``) is a serialized message, not text: never fatal.
        data = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
        labels = json.loads(data.pop("labels", "{}") or "{}")
        record = cls(job_id=data.pop("job_id"), tenant=data.pop("tenant"), labels=labels)
        for name, value in data.items():
            current = getattr(record, name, None)
            if current is None:
                continue  # a field of a newer version
            typed = value if isinstance(current, str) else type(current)(float(value))
            setattr(record, name, typed)
        return record

    def to_proto(self) -> jobs_pb2.Job:
        """The public view."""
        job = self._batch_proto()
        if self.kind == jobs_pb2.JOB_KIND_FINETUNE:
            job.adapter = self.adapter
            job.training.CopyFrom(
                jobs_pb2.TrainingProgress(
                    step=self.train_step,
                    total_steps=self.train_total,
                    loss=self.train_loss,
                    learning_rate=self.train_lr,
                    tokens_per_second=self.train_tokens_per_s,
                    waiting_seconds=self.train_waiting_s,
                    eta_unix_ms=self.train_eta_ms,
                    node_id=self.train_node,
                    checkpoint_step=self.checkpoint_step,
                )
            )
        return job

    def _batch_proto(self) -> jobs_pb2.Job:
        return jobs_pb2.Job(
            job_id=self.job_id,
            tenant=self.tenant,
            state=self.state,  # type: ignore[arg-type]
            kind=self.kind,  # type: ignore[arg-type]
            request_counts=jobs_pb2.RequestCounts(
                total=self.total,
                completed=self.completed,
                failed=self.failed,
                cancelled=self.cancelled,
                expired=self.expired,
                dead_lettered=self.dead_lettered,
            ),
            error=self.error,
            workload_class=self.workload_class,  # type: ignore[arg-type]
            idempotency_key=self.idempotency_key,
            created_at_unix_ms=self.created_ms,
            started_at_unix_ms=self.started_ms,
            finished_at_unix_ms=self.finished_ms,
            deadline_unix_ms=self.deadline_ms,
            predicted_completion_unix_ms=self.predicted_ms,
            expires_at_unix_ms=self.expires_ms,
            labels=self.labels,
        )
