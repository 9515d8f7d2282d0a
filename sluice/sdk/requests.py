"""Request messages both clients send, built from plain Python arguments."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypedDict, TypeVar, Unpack

from sluice.sdk.job_lines import job_chunks
from sluice.v1 import common_pb2, inference_pb2, jobs_pb2

PageRequest = TypeVar("PageRequest", jobs_pb2.ListJobsRequest, jobs_pb2.GetJobResultsRequest)
Page = jobs_pb2.ListJobsResponse | jobs_pb2.JobResultsPage

Prompt = str | Sequence[tuple[str, str]]
"""Raw prompt text, or a chat conversation as ``(role, content)`` pairs."""


def generation_options(
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
) -> common_pb2.GenerationOptions:
    """``GenerationOptions`` with only the given fields set (unset means the server default)."""
    options = common_pb2.GenerationOptions(stop=list(stop), ignore_eos=ignore_eos)
    if max_new_tokens is not None:
        options.max_new_tokens = max_new_tokens
    if temperature is not None:
        options.temperature = temperature
    if top_p is not None:
        options.top_p = top_p
    if seed is not None:
        options.seed = seed
    return options


def _messages(prompt: Sequence[tuple[str, str]]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=role, content=content) for role, content in prompt]


def generate_request(
    model: str,
    prompt: Prompt,
    options: common_pb2.GenerationOptions,
    *,
    workload_class: int,
    cache_bypass: bool,
    session_id: str,
) -> inference_pb2.GenerateRequest:
    """A ``GenerateRequest`` for raw text or a chat conversation."""
    request = inference_pb2.GenerateRequest(
        model=model,
        options=options,
        workload_class=workload_class,  # type: ignore[arg-type]
        cache_bypass=cache_bypass,
        session_id=session_id,
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.messages.extend(_messages(prompt))
    return request


def embed_request(
    model: str, inputs: Sequence[str], workload_class: int
) -> inference_pb2.EmbedRequest:
    """An ``EmbedRequest``; a lone string is one input, not a sequence of characters."""
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    return inference_pb2.EmbedRequest(
        model=model,
        inputs=texts,
        workload_class=workload_class,  # type: ignore[arg-type]
    )


class JobOptions(TypedDict, total=False):
    """Generation options of a job line (unset: the server's default)."""

    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: Sequence[str]


def generate_line(
    custom_id: str, model: str, prompt: Prompt, **options: Unpack[JobOptions]
) -> jobs_pb2.JobLine:
    """A generation line of a batch job: ``prompt`` is raw text or chat ``(role, content)``
    pairs; ``options`` as for ``generate``."""
    request = generate_request(
        model,
        prompt,
        generation_options(**options),
        workload_class=common_pb2.WORKLOAD_CLASS_UNSPECIFIED,
        cache_bypass=False,
        session_id="",
    )
    return jobs_pb2.JobLine(custom_id=custom_id, generate=request)


def embed_line(custom_id: str, model: str, inputs: Sequence[str]) -> jobs_pb2.JobLine:
    """An embedding line of a batch job (a lone string is one input)."""
    request = embed_request(model, inputs, common_pb2.WORKLOAD_CLASS_UNSPECIFIED)
    return jobs_pb2.JobLine(custom_id=custom_id, embed=request)


def submit_job_requests(
    lines: Sequence[jobs_pb2.JobLine],
    *,
    idempotency_key: str,
    completion_window_s: float | None,
    workload_class: int,
    labels: Mapping[str, str] | None,
    chunk_lines: int,
) -> list[jobs_pb2.SubmitJobRequest]:
    """A ``SubmitJob`` stream: the header, then ``lines`` in chunks of at most
    ``chunk_lines`` lines and :data:`~sluice.sdk.job_lines.MAX_CHUNK_BYTES` bytes. The window
    is rounded up to whole seconds (None: the server's default, 24 hours)."""
    if completion_window_s is not None and not completion_window_s > 0:
        raise ValueError("completion_window_s must be positive")
    header = jobs_pb2.JobHeader(
        kind=jobs_pb2.JOB_KIND_BATCH,
        idempotency_key=idempotency_key,
        completion_window_seconds=math.ceil(completion_window_s or 0),
        workload_class=workload_class,  # type: ignore[arg-type]
        line_count=len(lines),
        labels=dict(labels or {}),
    )
    return [
        jobs_pb2.SubmitJobRequest(header=header),
        *(jobs_pb2.SubmitJobRequest(lines=c) for c in job_chunks(lines, max_lines=chunk_lines)),
    ]


def submit_finetune_requests(
    examples: Sequence[jobs_pb2.JobLine],
    spec: jobs_pb2.FinetuneSpec,
    *,
    idempotency_key: str,
    completion_window_s: float | None,
    labels: Mapping[str, str] | None,
    chunk_lines: int,
) -> list[jobs_pb2.SubmitJobRequest]:
    """A ``SubmitJob`` stream of a fine-tune: a FINETUNE header with ``spec``, then the
    examples (``train`` lines) in chunks, as :func:`submit_job_requests`."""
    requests = submit_job_requests(
        examples,
        idempotency_key=idempotency_key,
        completion_window_s=completion_window_s,
        workload_class=common_pb2.WORKLOAD_CLASS_FINETUNE,
        labels=labels,
        chunk_lines=chunk_lines,
    )
    requests[0].header.kind = jobs_pb2.JOB_KIND_FINETUNE
    requests[0].header.finetune.CopyFrom(spec)
    return requests


def list_jobs_request(
    state: int | None, page_size: int, page_token: str
) -> jobs_pb2.ListJobsRequest:
    """A ``ListJobsRequest`` (``state`` None: every state)."""
    request = jobs_pb2.ListJobsRequest(page_size=page_size, page_token=page_token)
    if state is not None:
        request.state = state  # type: ignore[assignment]
    return request


def next_page(request: PageRequest, page: Page) -> PageRequest:
    """``request`` for the page after ``page`` (a copy with its ``next_page_token``)."""
    follow = type(request)()
    follow.CopyFrom(request)
    follow.page_token = page.next_page_token
    return follow


def is_last_page(page: Page) -> bool:
    """Whether ``page`` is the last one (no ``next_page_token``)."""
    return not page.next_page_token
