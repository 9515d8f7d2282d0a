"""The benchmark's calls through a scheduler's public port, on the raw stubs
(:class:`bench.jobs.calls.Caller`): fine-tune jobs (submit, progress, their steps), greedy chat
answers for the quality figure. REALTIME streams are :class:`bench.jobs.calls.RealtimeTarget`'s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from bench.finetune.task import Example
from bench.jobs.calls import FINAL_STATES, Caller, refusal_of, submit_requests
from sluice.v1 import common_pb2, inference_pb2, jobs_pb2

SUBMIT_CHUNK = 200
"""Lines per ``SubmitJob`` message."""


@dataclass(frozen=True)
class TrainSpec:
    """The fine-tune every job of the benchmark runs (all but the adapter's name and, for the
    load job, its length)."""

    steps: int = 80
    rank: int = 8
    learning_rate: float = 2e-3
    warmup_steps: int = 5
    micro_batch_size: int = 2
    max_sequence_tokens: int = 128
    checkpoint_every: int = 10
    seed: int = 19
    max_grad_norm: float = 1.0

    def proto(
        self, base_model: str, adapter: str, steps: int | None = None
    ) -> jobs_pb2.FinetuneSpec:
        """The ``FinetuneSpec`` making ``adapter`` (``steps`` overrides the length)."""
        return jobs_pb2.FinetuneSpec(
            base_model=base_model,
            adapter_name=adapter,
            lora=jobs_pb2.LoraSettings(rank=self.rank, alpha=2.0 * self.rank),
            optimizer=jobs_pb2.OptimizerSettings(
                learning_rate=self.learning_rate,
                schedule=jobs_pb2.LR_SCHEDULE_COSINE,
                warmup_steps=self.warmup_steps,
                max_grad_norm=self.max_grad_norm,
            ),
            max_steps=steps or self.steps,
            micro_batch_size=self.micro_batch_size,
            max_sequence_tokens=self.max_sequence_tokens,
            checkpoint_every_steps=self.checkpoint_every,
            seed=self.seed,
        )


def training_lines(examples: Sequence[Example]) -> list[jobs_pb2.JobLine]:
    """The examples as a fine-tune's ``train`` lines (chat: the assistant turn learned)."""
    return [
        jobs_pb2.JobLine(
            custom_id=f"ex-{i}",
            train=jobs_pb2.TrainingExample(
                messages=[
                    common_pb2.ChatMessage(role="user", content=e.prompt),
                    common_pb2.ChatMessage(role="assistant", content=e.expected),
                ]
            ),
        )
        for i, e in enumerate(examples)
    ]


async def submit_finetune(
    caller: Caller, spec: jobs_pb2.FinetuneSpec, lines: Sequence[jobs_pb2.JobLine]
) -> jobs_pb2.Job:
    """Submit a FINETUNE job; a refusal raises ``RuntimeError`` with its code and reason."""
    header = jobs_pb2.JobHeader(
        kind=jobs_pb2.JOB_KIND_FINETUNE,
        completion_window_seconds=3600,
        line_count=len(lines),
        finetune=spec,
    )
    try:
        job: jobs_pb2.Job = await caller.jobs.SubmitJob(
            submit_requests(header, lines, SUBMIT_CHUNK), metadata=caller.metadata, timeout=60
        )
    except grpc.aio.AioRpcError as exc:
        r = refusal_of(exc)
        raise RuntimeError(f"fine-tune refused: {r.code} {r.reason} {r.message}") from exc
    return job


async def wait_job(
    caller: Caller,
    job_id: str,
    done: Callable[[jobs_pb2.Job], bool],
    timeout_s: float,
    poll_s: float = 0.1,
    nodes: list[str] | None = None,
) -> jobs_pb2.Job:
    """Poll the job until ``done`` says so (a final state that is not ``done`` raises);
    ``TimeoutError`` after ``timeout_s``. Failed polls (a node restarting) are retried.
    ``nodes`` collects the nodes seen training it, in order."""
    deadline = time.monotonic() + timeout_s
    last: jobs_pb2.Job | None = None
    while time.monotonic() < deadline:
        try:
            last = await caller.get(job_id)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(poll_s)
            continue
        node = last.training.node_id
        if nodes is not None and node and (not nodes or nodes[-1] != node):
            nodes.append(node)
        if done(last):
            return last
        if last.state in FINAL_STATES:
            state = jobs_pb2.JobState.Name(last.state)
            raise RuntimeError(f"job {job_id} ended {state}: {last.error or 'no error'}")
        await asyncio.sleep(poll_s)
    where = "" if last is None else f" (at step {last.training.step}, {last.state})"
    raise TimeoutError(f"job {job_id} not there within {timeout_s:g} s{where}")


@dataclass(frozen=True)
class LoggedStep:
    """One step of a fine-tune's results."""

    step: int
    loss: float
    tokens: int
    at_unix_ms: int
    deliveries: int
    """The driver's attempt that logged it (2 and up: after a move)."""


async def job_steps(caller: Caller, job_id: str) -> list[LoggedStep]:
    """The job's logged steps, in step order."""
    results = await caller.results(job_id)
    steps = [
        LoggedStep(r.step.step, r.step.loss, r.step.tokens, r.step.at_unix_ms, r.deliveries)
        for r in results
        if r.WhichOneof("outcome") == "step"
    ]
    return sorted(steps, key=lambda s: s.step)


async def chat_answer(caller: Caller, model: str, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer of ``model`` (``"<base>:<adapter>"`` for an adapter) to one user
    turn, through ``Generate``; an error's code and reason in angle brackets instead."""
    message = inference_pb2.GenerateRequest(
        model=model,
        messages=[common_pb2.ChatMessage(role="user", content=prompt)],
        options=common_pb2.GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0),
        workload_class=common_pb2.WORKLOAD_CLASS_REALTIME,
        cache_bypass=True,
    )
    try:
        chunks = [
            c.text
            async for c in caller.inference.Generate(message, metadata=caller.metadata, timeout=120)
        ]
    except grpc.aio.AioRpcError as exc:
        r = refusal_of(exc)
        return f"<{r.code} {r.reason}: {r.message}>"
    return "".join(chunks)
