"""A fine-tune job's submission: its spec checked and completed with the proto's defaults, its
examples validated one by one.

Unlike a batch job, a fine-tune with a malformed example is refused whole (INVALID_ARGUMENT +
BadRequest): training silently on part of a dataset would give an adapter nobody asked for.
Every malformed example is named by its line number and field
(``lines[4].train.messages[2].role``: "line 4: ..."); the first few go in the details, with
the count of the rest. The spec's numbers are the contract's (:mod:`sluice.limits`,
checked again by the node); the limits (``MAX_FINETUNE_*``) keep the whole dataset inside one
``NodeTrainRequest`` under the node's 16 MiB message limit.

The adapter's name is unique per tenant: a registered adapter of that name, or a fine-tune job
of it that is not FAILED, CANCELLED or EXPIRED, refuses the job ALREADY_EXISTS
(:class:`AdapterExists`); the claim is taken atomically when the job commits
(:mod:`scheduler.jobs.finetune_store`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from scheduler.jobs.intake import MAX_CUSTOM_ID_CHARS
from scheduler.lifecycle import estimated_tokens
from scheduler.tenants import Tenant
from sluice import limits
from sluice.runtime.errors import InvalidArgument, PermissionDenied, SluiceError
from sluice.v1 import jobs_pb2

MAX_FINETUNE_EXAMPLES = 20_000
"""Examples (lines) of one fine-tune job at most."""
MAX_FINETUNE_BYTES = 12 * 1024 * 1024
"""Serialized examples of one job at most: with the spec they fit one ``NodeTrainRequest``
under the node's 16 MiB message limit."""
MAX_EXAMPLE_CHARS = 200_000
"""Characters of one example (prompt and completion, or every message's content)."""
SHOWN_LINE_ERRORS = 9
"""Malformed examples listed in the refusal's details (the rest are counted)."""
ADAPTER_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
"""An adapter name: a DNS label (lower-case letters, digits and inner hyphens, 1-63)."""


class AdapterExists(SluiceError):
    """The tenant already has an adapter of that name, or a fine-tune job making one."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ADAPTER_EXISTS"


def _set(spec: jobs_pb2.FinetuneSpec, path: str, value: float) -> None:
    *parents, name = path.split(".")
    target: object = spec
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, value)


def check_spec(
    spec: jobs_pb2.FinetuneSpec, tenant: Tenant, known_model: Callable[[str], bool]
) -> jobs_pb2.FinetuneSpec:
    """The spec with the proto's defaults filled in, or INVALID_ARGUMENT naming every bad
    field (``header.finetune.<field>``); PERMISSION_DENIED when the tenant may not use the
    base model."""
    bad: list[tuple[str, str]] = []
    out = jobs_pb2.FinetuneSpec()
    out.CopyFrom(spec)
    where = "header.finetune."
    if not spec.base_model:
        bad.append((where + "base_model", "required: a model the fleet serves"))
    elif len(spec.base_model) > limits.MAX_MODEL_NAME_CHARS or not known_model(spec.base_model):
        bad.append((where + "base_model", "not a generation model this fleet knows"))
    elif not tenant.may_use_model(spec.base_model):
        raise PermissionDenied(f"this tenant may not use model {spec.base_model!r}")
    if not ADAPTER_NAME.fullmatch(spec.adapter_name):
        bad.append(
            (
                where + "adapter_name",
                "required: 1-63 lower-case letters, digits and inner hyphens (a DNS label)",
            )
        )
    bad += limits.finetune_spec_violations(spec, where)
    for path, value in limits.finetune_ints(spec).items():
        _set(out, path, value)
    if bad:
        raise InvalidArgument(bad)
    if not out.lora.alpha:
        out.lora.alpha = 2.0 * out.lora.rank
    if not out.optimizer.learning_rate:
        out.optimizer.learning_rate = limits.DEFAULT_LEARNING_RATE
    if not out.optimizer.schedule:
        out.optimizer.schedule = jobs_pb2.LR_SCHEDULE_COSINE
    if not out.lora.target_modules:
        out.lora.target_modules.extend(limits.DEFAULT_LORA_TARGET_MODULES)
    return out


def total_steps(spec: jobs_pb2.FinetuneSpec, examples: int) -> int:
    """Optimizer steps the fine-tune runs, as the node counts them (``max_steps``, else every
    epoch's micro-batches over the accumulation, rounded up)."""
    if spec.max_steps:
        return spec.max_steps
    micro = max(1, spec.micro_batch_size)
    per_epoch = -(-examples // micro)
    accumulation = max(1, spec.gradient_accumulation_steps)
    return -(-max(1, spec.epochs) * per_epoch // accumulation)


def example_violations(line: jobs_pb2.JobLine) -> list[tuple[str, str]]:
    """What is wrong with one line of a fine-tune job, as ``(field, why)`` pairs named from
    the line (``train.messages[2].role``)."""
    if line.WhichOneof("body") != "train":
        return [("body", "a fine-tune job's lines are train lines")]
    example = line.train
    bad: list[tuple[str, str]] = []
    if len(line.custom_id) > MAX_CUSTOM_ID_CHARS:
        bad.append(("custom_id", f"at most {MAX_CUSTOM_ID_CHARS} characters"))
    if example.messages:
        if example.prompt or example.completion:
            bad.append(("train", "set prompt and completion, or messages, not both"))
        bad += _chat_violations(example)
    elif not example.completion:
        bad.append(("train.completion", "required: the text to learn (or send messages)"))
    chars = len(example.prompt) + len(example.completion)
    chars += sum(len(m.content) for m in example.messages)
    if chars > MAX_EXAMPLE_CHARS:
        bad.append(("train", f"{chars} characters, at most {MAX_EXAMPLE_CHARS}"))
    return bad


def _chat_violations(example: jobs_pb2.TrainingExample) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    messages = example.messages
    if len(messages) > limits.MAX_MESSAGES:
        bad.append(("train.messages", f"at most {limits.MAX_MESSAGES} messages"))
    for i, message in enumerate(messages[: limits.MAX_MESSAGES]):
        if message.role not in limits.CHAT_ROLES:
            bad.append((f"train.messages[{i}].role", "system, user or assistant"))
    if messages[0].role == "assistant":
        bad.append(("train.messages[0].role", "a conversation cannot start with the assistant"))
    last = messages[-1]
    if last.role != "assistant" or not last.content:
        bad.append(
            (
                f"train.messages[{len(messages) - 1}]",
                "the last message must be the assistant's, not empty: the turn to learn",
            )
        )
    return bad


@dataclass
class TrainIntake:
    """Examples of one fine-tune submission as they arrive: the valid ones ready to store with
    their estimated tokens, the problems of the others collected for the refusal."""

    line_count: int
    """The header's announced count (0: not announced)."""
    chars_per_token: float
    count: int = 0
    size_bytes: int = 0
    work_tokens: float = 0.0
    bad_lines: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)

    def take(self, lines: jobs_pb2.JobLines) -> list[tuple[int, bytes, float]]:
        """``(line_number, JobLine bytes, tokens)`` of this chunk's valid examples; refuses the
        whole job when a limit of the job is crossed."""
        valid: list[tuple[int, bytes, float]] = []
        for line in lines.lines:
            self.count += 1
            if self.count > MAX_FINETUNE_EXAMPLES:
                raise InvalidArgument(
                    [("lines", f"at most {MAX_FINETUNE_EXAMPLES} examples a fine-tune job")]
                )
            broken = example_violations(line)
            if broken:
                self.bad_lines += 1
                n = self.count
                self.problems += [(f"lines[{n}].{f}", f"line {n}: {why}") for f, why in broken]
                continue
            body = line.SerializeToString()
            self.size_bytes += len(body)
            if self.size_bytes > MAX_FINETUNE_BYTES:
                raise InvalidArgument(
                    [("lines", f"at most {MAX_FINETUNE_BYTES} bytes of examples a job")]
                )
            example = line.train
            chars = len(example.prompt) + len(example.completion)
            chars += sum(len(m.content) + 16 for m in example.messages)
            tokens = float(estimated_tokens(chars, self.chars_per_token))
            self.work_tokens += tokens
            valid.append((self.count, body, tokens))
        return valid

    def check_complete(self, spec: jobs_pb2.FinetuneSpec) -> int:
        """Refuse a job with a malformed example, no example, another count than announced,
        or more steps than allowed; returns its total optimizer steps."""
        if self.bad_lines:
            listed = self.problems[:SHOWN_LINE_ERRORS]
            summary = (
                "lines",
                f"{self.bad_lines} of {self.count} examples are malformed (nothing was "
                f"stored); the first problems follow",
            )
            raise InvalidArgument([summary, *listed], reason="MALFORMED_EXAMPLES")
        if self.count == 0:
            raise InvalidArgument([("lines", "a fine-tune job needs at least one example")])
        if self.line_count and self.line_count != self.count:
            raise InvalidArgument(
                [("header.line_count", f"announced {self.line_count} lines, {self.count} arrived")]
            )
        steps = total_steps(spec, self.count)
        if steps > limits.FINETUNE_MAX_STEPS:
            raise InvalidArgument(
                [
                    (
                        "header.finetune.epochs",
                        f"{steps} steps in all, at most {limits.FINETUNE_MAX_STEPS}",
                    )
                ]
            )
        return steps
