"""Request messages both clients send, built from plain Python arguments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict, Unpack

from sluice.v1 import common_pb2, inference_pb2, jobs_pb2

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
    """Generation options of every item of a batch job (unset: the server's default)."""

    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: Sequence[str]


def batch_job(
    model: str, prompts: Sequence[Prompt] | dict[str, Prompt], **options: Unpack[JobOptions]
) -> jobs_pb2.BatchGenerationSpec:
    """A batch-generation job spec for ``submit_job``.

    ``prompts`` is a list (items get ids ``"0"``, ``"1"``, …) or a dict of id → prompt.
    """
    items = prompts if isinstance(prompts, dict) else {str(i): p for i, p in enumerate(prompts)}
    spec = jobs_pb2.BatchGenerationSpec(model=model, options=generation_options(**options))
    for item_id, prompt in items.items():
        if isinstance(prompt, str):
            spec.items.append(jobs_pb2.BatchItem(id=item_id, prompt=prompt))
        else:
            spec.items.append(jobs_pb2.BatchItem(id=item_id, messages=_messages(prompt)))
    return spec


def submit_job_request(
    spec: jobs_pb2.BatchGenerationSpec | jobs_pb2.FinetuneSpec, idempotency_key: str
) -> jobs_pb2.SubmitJobRequest:
    """A ``SubmitJobRequest`` with ``spec`` in the right ``oneof`` branch."""
    if isinstance(spec, jobs_pb2.BatchGenerationSpec):
        return jobs_pb2.SubmitJobRequest(batch=spec, idempotency_key=idempotency_key)
    if isinstance(spec, jobs_pb2.FinetuneSpec):
        return jobs_pb2.SubmitJobRequest(finetune=spec, idempotency_key=idempotency_key)
    raise TypeError(f"a job spec is a BatchGenerationSpec or a FinetuneSpec, not {type(spec)}")


def list_jobs_request(
    state: int | None, page_size: int, page_token: str
) -> jobs_pb2.ListJobsRequest:
    """A ``ListJobsRequest`` (``state`` None: every state)."""
    request = jobs_pb2.ListJobsRequest(page_size=page_size, page_token=page_token)
    if state is not None:
        request.state = state  # type: ignore[assignment]
    return request
