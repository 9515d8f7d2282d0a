"""A job's submission: the header checked, each line validated on its own.

A malformed line does not fail the job: it gets an error result at once (INVALID_ARGUMENT,
its line number and field in the message) and the other lines run. What refuses the whole job
(INVALID_ARGUMENT + BadRequest): a bad header, no lines, more than ``MAX_JOB_LINES`` lines or
``MAX_JOB_BYTES`` of them, a line count that differs from the header's, a duplicate
``custom_id``. A valid line is stored with the defaults applied and the job's class set, so a
worker runs exactly what was validated.

A FINETUNE job's header is checked here too (its class FINETUNE, its ``finetune`` spec
present); the spec and the examples are :mod:`scheduler.jobs.finetune_intake`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from scheduler.lifecycle import estimated_tokens
from scheduler.tenants import Tenant
from scheduler.validation import Catalog, validate_embed, validate_generate
from sluice.contract import WorkloadClass
from sluice.runtime.errors import InvalidArgument, SluiceError
from sluice.v1 import common_pb2, jobs_pb2

MAX_JOB_LINES = 50_000
MAX_JOB_BYTES = 64 * 1024 * 1024
"""Serialized lines of one job at most (each SubmitJob message is at most 16 MiB)."""
MAX_CUSTOM_ID_CHARS = 128
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_LABELS = 16
MAX_LABEL_KEY_CHARS = 64
MAX_LABEL_VALUE_CHARS = 256
WINDOW_RANGE_S = (1.0, 7 * 86400.0)
JOB_CLASSES = frozenset({WorkloadClass.BATCH, WorkloadClass.FINETUNE})


@dataclass(frozen=True)
class Header:
    """A checked job header."""

    kind: int
    workload_class: WorkloadClass
    idempotency_key: str
    window_s: float
    line_count: int
    labels: dict[str, str]


def check_header(header: jobs_pb2.JobHeader, tenant: Tenant, default_window_s: float) -> Header:
    """The header with defaults applied, or INVALID_ARGUMENT naming every bad field."""
    bad: list[tuple[str, str]] = []
    kind = header.kind or jobs_pb2.JOB_KIND_BATCH
    finetune = kind == jobs_pb2.JOB_KIND_FINETUNE
    if kind not in (jobs_pb2.JOB_KIND_BATCH, jobs_pb2.JOB_KIND_FINETUNE):
        bad.append(("header.kind", f"unknown job kind {kind}"))
    if header.HasField("finetune") and not finetune:
        bad.append(("header.finetune", "only a FINETUNE job has a fine-tune spec"))
    if finetune and not header.HasField("finetune"):
        bad.append(("header.finetune", "required: what to fine-tune (base model, adapter name)"))
    default_class = (
        common_pb2.WORKLOAD_CLASS_FINETUNE if finetune else common_pb2.WORKLOAD_CLASS_BATCH
    )
    cls_value = header.workload_class or default_class
    if cls_value not in {int(c) for c in JOB_CLASSES}:
        bad.append(("header.workload_class", "jobs run in BATCH or FINETUNE"))
    elif finetune and cls_value != common_pb2.WORKLOAD_CLASS_FINETUNE:
        bad.append(("header.workload_class", "a fine-tune job runs in FINETUNE"))
    elif not tenant.may_use_class(cls_value):
        bad.append(("header.workload_class", "this tenant may not use that class"))
    window = float(header.completion_window_seconds or default_window_s)
    low, high = WINDOW_RANGE_S
    if not low <= window <= high:
        bad.append(("header.completion_window_seconds", f"{low:.0f}-{high:.0f} seconds"))
    if len(header.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        bad.append(("header.idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"))
    if not 0 <= header.line_count <= MAX_JOB_LINES:
        bad.append(("header.line_count", f"0-{MAX_JOB_LINES}"))
    bad += _label_violations(dict(header.labels))
    if bad:
        raise InvalidArgument(bad)
    return Header(
        kind=kind,
        workload_class=WorkloadClass(cls_value),
        idempotency_key=header.idempotency_key,
        window_s=window,
        line_count=header.line_count,
        labels=dict(header.labels),
    )


def _label_violations(labels: dict[str, str]) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    if len(labels) > MAX_LABELS:
        bad.append(("header.labels", f"at most {MAX_LABELS} labels"))
    for key, value in labels.items():
        if not 0 < len(key) <= MAX_LABEL_KEY_CHARS or len(value) > MAX_LABEL_VALUE_CHARS:
            bad.append(
                (
                    f"header.labels[{key[:MAX_LABEL_KEY_CHARS]}]",
                    f"keys 1-{MAX_LABEL_KEY_CHARS} characters, values at most "
                    f"{MAX_LABEL_VALUE_CHARS}",
                )
            )
    return bad


@dataclass
class Intake:
    """Lines of one submission as they arrive: valid ones ready to store with their estimated
    work, malformed ones as error results."""

    tenant: Tenant
    catalog: Catalog
    header: Header
    chars_per_token: float
    prompt_token_weight: float
    count: int = 0
    size_bytes: int = 0
    work_tokens: float = 0.0
    seen: set[str] = field(default_factory=set)

    def take(
        self, lines: jobs_pb2.JobLines
    ) -> tuple[list[tuple[int, bytes, float]], list[tuple[str, bytes]]]:
        """``(line_number, JobLine bytes, tokens)`` of the valid lines of this chunk and
        ``(custom_id, JobResult bytes)`` of the malformed ones; refuses the whole job when a
        limit of the job is crossed."""
        valid: list[tuple[int, bytes, float]] = []
        failed: list[tuple[str, bytes]] = []
        for line in lines.lines:
            self.count += 1
            self._within_limits(line)
            try:
                checked, tokens = self._validate(line)
            except InvalidArgument as exc:
                failed.append((line.custom_id, _error_result(line, self.count, exc)))
                continue
            body = checked.SerializeToString()
            self.size_bytes += len(body)
            self.work_tokens += tokens
            valid.append((self.count, body, tokens))
        if self.size_bytes > MAX_JOB_BYTES:
            raise InvalidArgument([("lines", f"at most {MAX_JOB_BYTES} bytes of lines a job")])
        return valid, failed

    def _within_limits(self, line: jobs_pb2.JobLine) -> None:
        where = f"lines[{self.count}]"
        if self.count > MAX_JOB_LINES:
            raise InvalidArgument([("lines", f"at most {MAX_JOB_LINES} lines a job")])
        if not 0 < len(line.custom_id) <= MAX_CUSTOM_ID_CHARS:
            raise InvalidArgument([(f"{where}.custom_id", f"1-{MAX_CUSTOM_ID_CHARS} characters")])
        if line.custom_id in self.seen:
            raise InvalidArgument([(f"{where}.custom_id", f"{line.custom_id!r} repeats")])
        self.seen.add(line.custom_id)

    def _validate(self, line: jobs_pb2.JobLine) -> tuple[jobs_pb2.JobLine, float]:
        """The line with defaults and the job's class applied, and its estimated work."""
        cls = int(self.header.workload_class)
        kind = line.WhichOneof("body")
        if kind == "generate":
            request = jobs_pb2.JobLine().generate
            request.CopyFrom(line.generate)
            request.workload_class = cls  # type: ignore[assignment]
            checked = validate_generate(request, self.tenant, self.catalog)
            chars = len(checked.prompt) + sum(len(m.content) + 16 for m in checked.messages)
            prompt = estimated_tokens(chars, self.chars_per_token)
            tokens = prompt * self.prompt_token_weight + checked.options.max_new_tokens
            return jobs_pb2.JobLine(custom_id=line.custom_id, generate=checked), tokens
        if kind == "embed":
            embed = jobs_pb2.JobLine().embed
            embed.CopyFrom(line.embed)
            embed.workload_class = cls  # type: ignore[assignment]
            checked_embed = validate_embed(embed, self.tenant, self.catalog)
            chars = sum(len(t) for t in checked_embed.inputs)
            tokens = estimated_tokens(chars, self.chars_per_token) * self.prompt_token_weight
            return jobs_pb2.JobLine(custom_id=line.custom_id, embed=checked_embed), tokens
        if kind == "train":
            raise InvalidArgument([("train", "train lines belong to FINETUNE jobs")])
        raise InvalidArgument([("body", "set generate or embed")])

    def check_complete(self) -> None:
        """Refuse a job whose stream ended with no line or fewer/more than announced."""
        if self.count == 0:
            raise InvalidArgument([("lines", "a job needs at least one line")])
        expected = self.header.line_count
        if expected and expected != self.count:
            raise InvalidArgument(
                [("header.line_count", f"announced {expected} lines, {self.count} arrived")]
            )


def _error_result(line: jobs_pb2.JobLine, number: int, exc: SluiceError) -> bytes:
    violations = getattr(exc, "violations", [])
    where = "; ".join(f"{f}: {d}" for f, d in violations) or exc.message
    return jobs_pb2.JobResult(
        custom_id=line.custom_id,
        error=jobs_pb2.LineError(
            code=exc.code.value[0], reason=exc.reason, message=f"line {number}: {where}"
        ),
        line_number=number,
        finished_at_unix_ms=int(time.time() * 1000),
    ).SerializeToString()
