"""The load of ``bench.scheduler``, run in its own process so that the probes the main process
times are not delayed by this process's event loop (it parses every streamed chunk). The spec
may name CPUs; the process moves itself onto them before it starts (``bench.scheduler`` puts it
on the node's CPU, away from the scheduler's).

Two modes, both with a fixed output length per request (``ignore_eos``):

- **Closed loop** (:class:`LoadSpec`, fairness and capacity): each tenant keeps ``in_flight``
  generations open at all times (a finished one is replaced at once), so every tenant always
  has work queued in the scheduler. Tokens are counted as their chunks arrive, only inside the
  steady window ``[start + warmup_s, start + warmup_s + window_s)``; at the window's end every
  open call is cancelled.
- **Open loop** (:class:`OpenLoopSpec`, isolation): each tenant's requests arrive as a Poisson
  process at its own rate, from a seeded schedule, whatever happened to the earlier ones; each
  is streamed to its end under the spec's deadline. Requests that *arrive* inside the window
  are measured (time to first chunk from the call's start, and how the call ended); arrivals
  go on past the window until every measured request has ended, so the last ones see the same
  load as the first. At most ``max_open`` calls are open at once; an arrival beyond that is
  not sent, and counted.

:func:`load_process` is the parent's side: it spawns this module's :func:`main` with a spec and
hands back its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import grpc

from sluice.contract import WorkloadClass
from sluice.sdk.errors import from_rpc_error
from sluice.v1 import common_pb2, inference_pb2, inference_pb2_grpc

GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]
REFUSAL_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


@dataclass(frozen=True)
class LoadSpec:
    """What the load process does (picklable: it crosses a process boundary)."""

    address: str
    keys: dict[str, str]
    """Tenant name → API key, one closed loop per tenant."""
    model: str
    in_flight: int
    max_new_tokens: int
    warmup_s: float
    window_s: float
    cpus: frozenset[int] = frozenset()
    """CPUs the load process runs on; empty: those it inherits."""


@dataclass(frozen=True)
class OpenLoopSpec:
    """One open-loop phase (picklable: it crosses a process boundary)."""

    address: str
    keys: dict[str, str]
    """Tenant name → API key."""
    rates: dict[str, float]
    """Tenant name → mean arrivals per second (Poisson)."""
    model: str
    max_new_tokens: int
    warmup_s: float
    window_s: float
    deadline_s: float
    """Each call's gRPC deadline; it also bounds the wait for the window's last requests."""
    seed: int
    """Seeds each tenant's schedule (with its name): the same seed and rate, the same arrivals."""
    max_open: int = 2000
    """Most calls open at once; arrivals beyond it are counted, not sent."""
    cpus: frozenset[int] = frozenset()
    """CPUs the load process runs on; empty: those it inherits."""


@dataclass
class TenantLoad:
    """What one tenant got inside the window."""

    tokens: int = 0
    completed: int = 0
    ttft_s: list[float] = field(default_factory=list)
    refused: int = 0
    """Calls refused with a retry delay: the worker waited that long, as a client should."""
    errors: Counter[str] = field(default_factory=Counter)


def generate_request(model: str, prompt: str, max_new_tokens: int) -> inference_pb2.GenerateRequest:
    """A REALTIME request of exactly ``max_new_tokens`` tokens that skips the response cache."""
    return inference_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        options=common_pb2.GenerationOptions(max_new_tokens=max_new_tokens, ignore_eos=True),
        workload_class=WorkloadClass.REALTIME,  # type: ignore[arg-type]
        cache_bypass=True,
    )


async def _loop(
    stub: inference_pb2_grpc.InferenceStub,
    spec: LoadSpec,
    tenant: str,
    worker: int,
    window: tuple[float, float],
    into: TenantLoad,
) -> None:
    metadata = (("authorization", f"Bearer {spec.keys[tenant]}"),)
    start, end = window
    n = 0
    while time.monotonic() < end:
        n += 1
        req = generate_request(spec.model, f"{tenant} {worker} {n}", spec.max_new_tokens)
        sent = time.monotonic()
        call = stub.Generate(req, metadata=metadata, timeout=end - sent + 30.0)
        first = True
        try:
            async for chunk in call:
                now = time.monotonic()
                if now >= end:
                    break
                if now >= start:
                    into.tokens += len(chunk.token_ids)
                    if first and sent >= start:
                        into.ttft_s.append(now - sent)
                first = False
            else:
                if time.monotonic() >= start:
                    into.completed += 1
        except grpc.aio.AioRpcError as exc:
            now = time.monotonic()
            if now >= end:
                continue
            retry = from_rpc_error(exc).retry_after_s
            if exc.code() in REFUSAL_CODES and retry is not None:
                if now >= start:
                    into.refused += 1
                await asyncio.sleep(min(retry, end - now))  # come back when told to
                continue
            into.errors[exc.code().name] += 1
            await asyncio.sleep(0.05)  # an error loop must not spin
        finally:
            call.cancel()


def poisson_arrivals(rate: float, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival times in ``[0, duration_s)`` of a Poisson process of ``rate`` per second
    (exponential gaps drawn from ``rng``); none for a rate of zero or less."""
    arrivals: list[float] = []
    if rate <= 0:
        return arrivals
    at = rng.expovariate(rate)
    while at < duration_s:
        arrivals.append(at)
        at += rng.expovariate(rate)
    return arrivals


@dataclass
class Arrivals:
    """What one tenant's measured arrivals (those inside the window) got."""

    sent: int = 0
    not_sent: int = 0
    """Arrivals not sent because ``max_open`` calls were open."""
    ttft_s: list[float] = field(default_factory=list)
    """Call start to first chunk, of those that got one."""
    arrival_s: list[float] = field(default_factory=list)
    """Arrival time (from the window's start) of each ``ttft_s`` entry, in the same order."""
    launch_lag_s: list[float] = field(default_factory=list)
    """How late each call started after its scheduled arrival (this process's own delay)."""
    outcomes: Counter[str] = field(default_factory=Counter)
    """``ok``; ``refused CODE/REASON`` (an error before any chunk with a refusal's code);
    ``error CODE/REASON`` (any other error); ``unfinished`` (still open when the phase ended)."""


async def _one_call(
    stub: inference_pb2_grpc.InferenceStub,
    spec: OpenLoopSpec,
    tenant: str,
    n: int,
    arrival_s: float | None,
    into: Arrivals,
) -> None:
    """One open-loop request streamed to its end; ``arrival_s`` None: not measured."""
    metadata = (("authorization", f"Bearer {spec.keys[tenant]}"),)
    req = generate_request(spec.model, f"{tenant} {n}", spec.max_new_tokens)
    sent = time.monotonic()
    call = stub.Generate(req, metadata=metadata, timeout=spec.deadline_s)
    outcome, first = "unfinished", True
    try:
        async for _chunk in call:
            if first and arrival_s is not None:
                into.ttft_s.append(time.monotonic() - sent)
                into.arrival_s.append(arrival_s)
            first = False
        outcome = "ok"
    except grpc.aio.AioRpcError as exc:
        kind = "refused" if first and exc.code() in REFUSAL_CODES else "error"
        reason = from_rpc_error(exc).reason
        outcome = f"{kind} {exc.code().name}" + (f"/{reason}" if reason else "")
    except Exception as exc:  # counted, so one odd failure does not end the phase
        outcome = f"error {type(exc).__name__}"
    finally:
        call.cancel()
        if arrival_s is not None:
            into.outcomes[outcome] += 1


async def run_open(spec: OpenLoopSpec, started: Event | None = None) -> dict[str, Any]:
    """Drive one open-loop phase; returns per tenant what its measured arrivals got."""
    window = (spec.warmup_s, spec.warmup_s + spec.window_s)
    # Arrivals go on after the window while its requests finish, each within its deadline.
    horizon = window[1] + spec.deadline_s + 5.0
    open_calls: set[asyncio.Task[None]] = set()
    measured: list[asyncio.Task[None]] = []
    results = {t: Arrivals() for t in spec.rates}
    not_sent_total: Counter[str] = Counter()
    past_window = {t: asyncio.Event() for t in spec.rates}

    async def arrive(stub: inference_pb2_grpc.InferenceStub, tenant: str, t0: float) -> None:
        into = results[tenant]
        rng = random.Random(f"{spec.seed}:{tenant}")
        for n, at in enumerate(poisson_arrivals(spec.rates[tenant], horizon, rng)):
            if at >= window[1]:
                past_window[tenant].set()
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            in_window = window[0] <= at < window[1]
            if len(open_calls) >= spec.max_open:
                not_sent_total[tenant] += 1
                into.not_sent += in_window
                continue
            if in_window:
                into.sent += 1
                into.launch_lag_s.append(time.monotonic() - (t0 + at))
            arrival = at - window[0] if in_window else None
            task = asyncio.create_task(_one_call(stub, spec, tenant, n, arrival, into))
            open_calls.add(task)
            task.add_done_callback(open_calls.discard)
            if in_window:
                measured.append(task)
        past_window[tenant].set()

    async with grpc.aio.insecure_channel(spec.address, options=GRPC_OPTIONS) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await channel.channel_ready()
        t0 = time.monotonic()
        if started is not None:
            started.set()
        arrivers = [asyncio.create_task(arrive(stub, t, t0)) for t in spec.rates]
        try:
            for event in past_window.values():
                await event.wait()
            if measured:
                await asyncio.wait(measured, timeout=spec.deadline_s + 5.0)
        finally:
            tasks = [*arrivers, *open_calls]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "tenants": {
            t: {
                "rate_per_s": spec.rates[t],
                "sent": a.sent,
                "not_sent": a.not_sent,
                "not_sent_all_phase": not_sent_total[t],
                "ttft_s": a.ttft_s,
                "arrival_s": a.arrival_s,
                "launch_lag_s": a.launch_lag_s,
                "outcomes": dict(a.outcomes),
            }
            for t, a in results.items()
        },
    }


async def run(spec: LoadSpec, started: Event | None = None) -> dict[str, Any]:
    """Drive the load; returns per-tenant tokens, completions, TTFTs and errors in the window."""
    async with grpc.aio.insecure_channel(spec.address, options=GRPC_OPTIONS) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await channel.channel_ready()
        now = time.monotonic()
        window = (now + spec.warmup_s, now + spec.warmup_s + spec.window_s)
        if started is not None:
            started.set()
        loads = {t: TenantLoad() for t in spec.keys}
        await asyncio.gather(
            *(
                _loop(stub, spec, tenant, w, window, loads[tenant])
                for tenant in spec.keys
                for w in range(spec.in_flight)
            )
        )
    return {
        "window_start_monotonic": window[0],
        "tenants": {
            t: {
                "tokens": load.tokens,
                "completed": load.completed,
                "ttft_s": load.ttft_s,
                "refused": load.refused,
                "errors": dict(load.errors),
            }
            for t, load in loads.items()
        },
    }


def main(spec: LoadSpec | OpenLoopSpec, started: Event, out: Queue[dict[str, Any]]) -> None:
    """Process entry point: move onto the spec's CPUs, run the load, put its result (or the
    error) on ``out``."""
    try:
        if spec.cpus:
            os.sched_setaffinity(0, spec.cpus)
        if isinstance(spec, OpenLoopSpec):
            out.put(asyncio.run(run_open(spec, started)))
        else:
            out.put(asyncio.run(run(spec, started)))
    except BaseException as exc:
        started.set()
        out.put({"error": repr(exc)})
        raise


@contextlib.asynccontextmanager
async def load_process(
    spec: LoadSpec | OpenLoopSpec, result_timeout_s: float
) -> AsyncIterator[Callable[[], Awaitable[dict[str, Any]]]]:
    """Run ``spec`` in a spawned ``bench.scheduler.load`` process; inside the block (entered
    once the load has started) the yielded coroutine function waits for its result."""
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    out: Queue[dict[str, Any]] = ctx.Queue()
    proc = ctx.Process(target=main, args=(spec, started, out), name="load")
    proc.start()

    async def result() -> dict[str, Any]:
        got = await asyncio.to_thread(out.get, True, result_timeout_s)
        if "error" in got:
            raise RuntimeError(f"load process failed: {got['error']}")
        return got

    try:
        if not await asyncio.to_thread(started.wait, 120):
            raise TimeoutError("the load process did not start")
        yield result
    finally:
        await asyncio.to_thread(proc.join, 30)
        if proc.is_alive():
            proc.terminate()
