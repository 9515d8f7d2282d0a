"""Figures 4 and 5, *a killed node's job resumes; the adapter is served*, on the suite with a
second node started beside the first (both in the ``finetune`` pool, sharing the suite's
checkpoint and adapter stores):

1. **reference**: the quality task's fine-tune (:mod:`bench.finetune.task`), submitted through
   the Jobs API, runs uninterrupted to COMPLETED; its per-step losses are the reference;
2. **quality**: its adapter, registered by the scheduler, answers the held-out prompts
   through the public ``Generate`` as ``"<base>:<adapter>"`` with greedy decoding, and so does
   the base model; exact-match rates of both;
3. **kill**: the same fine-tune (same spec, data and seed; another adapter name) is submitted;
   once it has checkpointed at least once and gone half a checkpoint interval beyond (steps
   past its last checkpoint, which the next node must compute again), the node training it
   is sent SIGKILL; the job must resume on the other node (from its last
   checkpoint in the shared store) and complete; its per-step losses are compared with the
   reference's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.chaos.suite import OTHERS
from bench.finetune.calls import (
    TrainSpec,
    chat_answer,
    job_steps,
    submit_finetune,
    training_lines,
    wait_job,
)
from bench.finetune.figures import compare_losses, quality_verdict
from bench.finetune.suite import FIRST_NODE, SECOND_NODE, FinetuneSuite, NodeFlags
from bench.finetune.task import Example, exact_match, held_out_examples, training_examples
from bench.jobs.calls import Caller
from bench.jobs.suite import Running
from sluice.v1 import jobs_pb2

JOB_TENANT = OTHERS[0]
ADAPTER = "order-desk"
KILLED_ADAPTER = "order-desk-killed"
COMPLETED = jobs_pb2.JOB_STATE_COMPLETED


@dataclass(frozen=True)
class ResumeOptions:
    """The experiment's sizes and times."""

    eval_prompts: int = 20
    answer_tokens: int = 16
    eval_concurrency: int = 8
    job_timeout_s: float = 420.0
    adapter_wait_s: float = 30.0


async def _completed(
    caller: Caller, job_id: str, timeout_s: float, nodes: list[str]
) -> jobs_pb2.Job:
    return await wait_job(
        caller, job_id, lambda j: j.state == COMPLETED, timeout_s, poll_s=0.25, nodes=nodes
    )


async def reference(
    ctx: Running, tuner: Caller, model: str, spec: TrainSpec, opts: ResumeOptions
) -> dict[str, Any]:
    """The uninterrupted fine-tune, to COMPLETED; its steps and adapter."""
    lines = training_lines(training_examples())
    started = time.monotonic()
    job = await submit_finetune(tuner, spec.proto(model, ADAPTER), lines)
    ctx.event(f"reference job {job.job_id} submitted ({len(lines)} examples)")
    nodes: list[str] = []
    done = await _completed(tuner, job.job_id, opts.job_timeout_s, nodes)
    steps = await job_steps(tuner, job.job_id)
    ctx.event(f"reference job completed on {nodes}: {len(steps)} steps, adapter {done.adapter}")
    return {
        "job_id": job.job_id,
        "adapter": done.adapter,
        "examples": len(lines),
        "duration_s": round(time.monotonic() - started, 1),
        "nodes": nodes,
        "waiting_s": round(done.training.waiting_seconds, 1),
        "steps": [asdict(s) for s in steps],
    }


async def answers(
    caller: Caller, model: str, prompts: list[Example], opts: ResumeOptions
) -> list[dict[str, Any]]:
    """``model``'s greedy answers to the prompts, a few at a time."""
    gate = asyncio.Semaphore(opts.eval_concurrency)

    async def one(example: Example) -> dict[str, Any]:
        async with gate:
            text = await chat_answer(caller, model, example.prompt, opts.answer_tokens)
        return {
            "prompt": example.prompt,
            "expected": example.expected,
            "answer": text,
            "match": exact_match(text, example.expected),
        }

    return list(await asyncio.gather(*(one(e) for e in prompts)))


async def quality(
    ctx: Running, tuner: Caller, model: str, adapter: str, opts: ResumeOptions
) -> dict[str, Any]:
    """Exact-match rates of the adapter and the base model on the held-out prompts."""
    prompts = held_out_examples(opts.eval_prompts)
    deadline = time.monotonic() + opts.adapter_wait_s
    while True:  # registered before COMPLETED; a replica's view follows etcd within moments
        probe = await chat_answer(tuner, adapter, prompts[0].prompt, 1)
        if not probe.startswith("<NOT_FOUND") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    tuned = await answers(tuner, adapter, prompts, opts)
    base = await answers(tuner, model, prompts, opts)
    tuned_rate = sum(a["match"] for a in tuned) / len(tuned)
    base_rate = sum(a["match"] for a in base) / len(base)
    ctx.event(f"quality: adapter {tuned_rate * 100:.0f} %, base {base_rate * 100:.0f} %")
    return {
        "prompts": len(prompts),
        "adapter_model": adapter,
        "adapter_exact_match": tuned_rate,
        "base_exact_match": base_rate,
        "adapter_answers": tuned,
        "base_answers": base,
        **quality_verdict(tuned_rate, base_rate),
    }


async def killed(
    ctx: Running, tuner: Caller, model: str, spec: TrainSpec, opts: ResumeOptions
) -> dict[str, Any]:
    """The same fine-tune, its training node SIGKILLed mid-job; where and from which step
    it resumed, and its steps once COMPLETED."""
    suite = ctx.suite
    assert isinstance(suite, FinetuneSuite)
    lines = training_lines(training_examples())
    job = await submit_finetune(tuner, spec.proto(model, KILLED_ADAPTER), lines)
    ctx.event(f"job to kill {job.job_id} submitted")
    kill_step = spec.checkpoint_every + max(1, spec.checkpoint_every // 2)
    nodes: list[str] = []
    before = await wait_job(
        tuner,
        job.job_id,
        lambda j: (
            j.training.step >= kill_step and 1 <= j.training.checkpoint_step < j.training.step
        ),
        opts.job_timeout_s,
        poll_s=0.05,
        nodes=nodes,
    )
    victim = before.training.node_id
    pid = suite.node_pid(victim)
    if pid is None:
        raise RuntimeError(f"the training node {victim!r} has no live process to kill")
    os.kill(pid, signal.SIGKILL)
    killed_at, killed_unix_ms = time.monotonic(), int(time.time() * 1000)
    ctx.event(
        f"SIGKILL {victim} (pid {pid}) at step {before.training.step}, "
        f"checkpoint {before.training.checkpoint_step}"
    )
    moved = await wait_job(
        tuner,
        job.job_id,
        lambda j: bool(j.training.node_id) and j.training.node_id != victim,
        opts.job_timeout_s,
        poll_s=0.1,
        nodes=nodes,
    )
    resumed_after = round(time.monotonic() - killed_at, 2)
    ctx.event(f"resumed on {moved.training.node_id} after {resumed_after} s")
    done = await _completed(tuner, job.job_id, opts.job_timeout_s, nodes)
    steps = await job_steps(tuner, job.job_id)
    ctx.event(f"killed job completed, trained on {nodes}: {len(steps)} steps")
    return {
        "job_id": job.job_id,
        "killed_node": victim,
        "killed_at_step": before.training.step,
        "killed_at_unix_ms": killed_unix_ms,
        "checkpoint_at_kill": before.training.checkpoint_step,
        "resumed_on": moved.training.node_id,
        "resumed_after_s": resumed_after,
        "nodes": nodes,
        "state": jobs_pb2.JobState.Name(done.state),
        "steps": [asdict(s) for s in steps],
    }


def _losses(steps: list[dict[str, Any]]) -> dict[int, float]:
    return {int(s["step"]): float(s["loss"]) for s in steps}


async def resume_and_quality(
    ctx: Running, model: str, spec: TrainSpec, opts: ResumeOptions, flags: NodeFlags
) -> dict[str, Any]:
    """Run figures 4 and 5's experiment on a started suite; its figures."""
    suite = ctx.suite
    assert isinstance(suite, FinetuneSuite)
    ctx.clock.reset()
    if suite.node_flags is None:  # the sharing experiment did not run
        ctx.event(f"restarting {FIRST_NODE} with {flags}")
        await suite.configure(flags)
    ctx.event(f"starting {SECOND_NODE}")
    await asyncio.to_thread(suite.start_extra_node, SECOND_NODE)
    ctx.event(f"{SECOND_NODE} serves")
    tuner = Caller(suite.scheduler, suite.keys[JOB_TENANT], suite.public_credentials())
    try:
        ref = await reference(ctx, tuner, model, spec, opts)
        judged = await quality(ctx, tuner, model, ref["adapter"], opts)
        kill = await killed(ctx, tuner, model, spec, opts)
    finally:
        await tuner.close()
    comparison = compare_losses(_losses(ref["steps"]), _losses(kill["steps"]))
    moved = kill["resumed_on"] != kill["killed_node"]
    return {
        "reference": ref,
        "quality": judged,
        "kill": kill,
        "losses": comparison,
        "resumed_elsewhere": moved,
        "kill_pass": moved and kill["state"] == "JOB_STATE_COMPLETED" and comparison["pass"],
    }
