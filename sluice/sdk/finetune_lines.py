"""A fine-tune's dataset and settings, from what users have; its loss curve from its results.

:func:`parse_training_lines` reads OpenAI's fine-tuning JSONL (as its ``--finetune`` file, an
open file works as it is), dicts, ``TrainingExample`` or ``JobLine`` messages. A line is
either a prompt and the completion to learn::

    {"prompt": "What is 2+2?", "completion": "4"}

or a conversation whose assistant turns are learned (the last message is the assistant's)::

    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}]}

A message's ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts;
``developer`` reads as ``system``; its ``name`` is ignored. A ``custom_id`` is optional
(``line-<n>`` otherwise). Any other key (``weight``, ``tool_calls``, ...) is refused rather
than silently dropped. Every problem of every line is collected with its line number and field,
as for batch lines (:class:`~sluice.sdk.job_lines.JobLinesError`); the scheduler checks each
example again, and refuses the whole job if any is malformed.

:func:`finetune_spec` builds the ``FinetuneSpec`` (zero means the server's default: rank 8,
alpha 2 x rank, learning rate 2e-4, cosine, the attention projections, one epoch, ...).
:func:`loss_curve` turns a fine-tune's results into its steps, in order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

from sluice import limits
from sluice.sdk.job_lines import MAX_LINE_BYTES, JobLineError, ParsedLines
from sluice.sdk.openai_lines import ROLE_ALIASES, Problems
from sluice.sdk.openai_lines import _content as content_text
from sluice.v1 import common_pb2, jobs_pb2

TrainingLineInput = jobs_pb2.JobLine | jobs_pb2.TrainingExample | Mapping[str, Any] | str
"""One example as :func:`parse_training_lines` takes it."""

MAX_EXAMPLE_CHARS = 200_000
"""Characters of one example (the scheduler's limit, checked here first)."""
LINE_KEYS = frozenset({"prompt", "completion", "messages", "custom_id"})
MESSAGE_KEYS = frozenset({"role", "content", "name"})
SCHEDULES = {
    "constant": jobs_pb2.LR_SCHEDULE_CONSTANT,
    "linear": jobs_pb2.LR_SCHEDULE_LINEAR,
    "cosine": jobs_pb2.LR_SCHEDULE_COSINE,
}
"""Learning-rate schedules by name."""


class FinetuneSettings(TypedDict, total=False):
    """The fine-tune's knobs, as :func:`finetune_spec` takes them (unset or 0: the default)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: Sequence[str]
    learning_rate: float
    weight_decay: float
    schedule: str
    warmup_steps: int
    max_grad_norm: float
    epochs: int
    max_steps: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    seed: int
    max_sequence_tokens: int
    checkpoint_every_steps: int
    shared: bool


def finetune_spec(
    base_model: str, adapter_name: str, **settings: Unpack[FinetuneSettings]
) -> jobs_pb2.FinetuneSpec:
    """A ``FinetuneSpec`` of ``base_model`` making the adapter ``adapter_name`` (served as
    ``"<base_model>:<adapter_name>"``); ``settings`` as :class:`FinetuneSettings`.
    ``schedule`` is ``"constant"``, ``"linear"`` or ``"cosine"``."""
    unknown = sorted(set(settings) - set(FinetuneSettings.__annotations__))
    if unknown:
        raise TypeError(f"unknown fine-tune settings: {', '.join(unknown)}")
    schedule = settings.get("schedule")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    return jobs_pb2.FinetuneSpec(
        base_model=base_model,
        adapter_name=adapter_name,
        lora=jobs_pb2.LoraSettings(
            rank=settings.get("rank", 0),
            alpha=settings.get("alpha", 0.0),
            dropout=settings.get("dropout", 0.0),
            target_modules=list(settings.get("target_modules", ())),
        ),
        optimizer=jobs_pb2.OptimizerSettings(
            learning_rate=settings.get("learning_rate", 0.0),
            weight_decay=settings.get("weight_decay", 0.0),
            schedule=SCHEDULES[schedule] if schedule else jobs_pb2.LR_SCHEDULE_UNSPECIFIED,
            warmup_steps=settings.get("warmup_steps", 0),
            max_grad_norm=settings.get("max_grad_norm", 0.0),
        ),
        epochs=settings.get("epochs", 0),
        max_steps=settings.get("max_steps", 0),
        micro_batch_size=settings.get("micro_batch_size", 0),
        gradient_accumulation_steps=settings.get("gradient_accumulation_steps", 0),
        seed=settings.get("seed", 0),
        max_sequence_tokens=settings.get("max_sequence_tokens", 0),
        checkpoint_every_steps=settings.get("checkpoint_every_steps", 0),
        shared=settings.get("shared", False),
    )


def parse_training_lines(items: Iterable[TrainingLineInput]) -> ParsedLines:
    """Read a fine-tune's examples as ``train`` job lines, collecting every problem of every
    line (numbers from 1; blank text lines are skipped but counted)."""
    if isinstance(items, str | bytes):
        raise TypeError("pass the lines (e.g. an open JSONL file), not one string")
    lines: list[jobs_pb2.JobLine] = []
    errors: list[JobLineError] = []
    for number, item in enumerate(items, start=1):
        if isinstance(item, str) and not item.strip():
            continue
        line, problems = _read(item, number)
        if line is not None and not problems:
            problems += _example_problems(line.train)
            if line.ByteSize() > MAX_LINE_BYTES:
                problems.append(
                    ("", f"{line.ByteSize()} bytes serialized, at most {MAX_LINE_BYTES}")
                )
        if problems:
            errors.extend(JobLineError(number, f, why) for f, why in problems)
        elif line is not None:
            lines.append(line)
    return ParsedLines(lines, errors)


def _read(item: TrainingLineInput, number: int) -> tuple[jobs_pb2.JobLine | None, Problems]:
    if isinstance(item, jobs_pb2.JobLine):
        if item.WhichOneof("body") != "train":
            return None, [("", "a fine-tune's lines are training examples")]
        return item, []
    if isinstance(item, jobs_pb2.TrainingExample):
        return jobs_pb2.JobLine(custom_id=f"line-{number}", train=item), []
    value: object = item
    if isinstance(item, str):
        try:
            value = json.loads(item)
        except json.JSONDecodeError as exc:
            return None, [("", f"not JSON: {exc.msg} at column {exc.colno}")]
    if not isinstance(value, Mapping):
        return None, [("", "must be a JSON object")]
    return _from_mapping(value, number)


def _from_mapping(
    value: Mapping[str, Any], number: int
) -> tuple[jobs_pb2.JobLine | None, Problems]:
    problems: Problems = [(key, "unknown field") for key in sorted(set(value) - LINE_KEYS)]
    custom_id = value.get("custom_id", f"line-{number}")
    if not isinstance(custom_id, str) or not custom_id:
        problems.append(("custom_id", "a non-empty string when given"))
    example = jobs_pb2.TrainingExample()
    if "messages" in value:
        if "prompt" in value or "completion" in value:
            problems.append(("", "prompt and completion, or messages, not both"))
        _messages(value["messages"], example, problems)
    else:
        for key in ("prompt", "completion"):
            text = value.get(key, "")
            if not isinstance(text, str):
                problems.append((key, "must be a string"))
            else:
                setattr(example, key, text)
    if problems:
        return None, problems
    return jobs_pb2.JobLine(custom_id=str(custom_id), train=example), []


def _messages(raw: object, example: jobs_pb2.TrainingExample, problems: Problems) -> None:
    if not isinstance(raw, list) or not raw:
        problems.append(("messages", "a non-empty list of messages"))
        return
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            problems.append((where, "must be an object with role and content"))
            continue
        problems.extend(
            (f"{where}.{k}", "unknown field") for k in sorted(set(message) - MESSAGE_KEYS)
        )
        role = message.get("role")
        if not isinstance(role, str):
            problems.append((f"{where}.role", "must be a string"))
            continue
        text = content_text(message.get("content"), f"{where}.content", problems)
        if text is not None:
            role = ROLE_ALIASES.get(role, role)
            example.messages.append(common_pb2.ChatMessage(role=role, content=text))


def _example_problems(example: jobs_pb2.TrainingExample) -> Problems:
    """What the scheduler would refuse in a well-formed example."""
    problems: Problems = []
    messages = example.messages
    if messages:
        if len(messages) > limits.MAX_MESSAGES:
            problems.append(("messages", f"at most {limits.MAX_MESSAGES} messages"))
        for i, message in enumerate(messages):
            if message.role not in limits.CHAT_ROLES:
                problems.append((f"messages[{i}].role", "system, user or assistant"))
        if messages[0].role == "assistant":
            problems.append(("messages[0].role", "a conversation cannot start with the assistant"))
        if messages[-1].role != "assistant" or not messages[-1].content:
            problems.append(
                (f"messages[{len(messages) - 1}]", "the last message must be the assistant's")
            )
    elif not example.completion:
        problems.append(("completion", "required: the text to learn (or give messages)"))
    chars = len(example.prompt) + len(example.completion) + sum(len(m.content) for m in messages)
    if chars > MAX_EXAMPLE_CHARS:
        problems.append(("", f"{chars} characters, at most {MAX_EXAMPLE_CHARS}"))
    return problems


def loss_curve(results: Iterable[jobs_pb2.JobResult]) -> list[jobs_pb2.TrainingStep]:
    """A fine-tune's steps from its results (``job_results``), each once, in step order."""
    steps = {r.step.step: r.step for r in results if r.WhichOneof("outcome") == "step"}
    return [steps[k] for k in sorted(steps)]
