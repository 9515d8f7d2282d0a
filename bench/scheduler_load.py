"""The fairness load of ``bench.scheduler``, run in its own process so that the probes the main
process times are not delayed by this process's event loop (it parses every streamed chunk).

Closed loop: each tenant keeps ``in_flight`` generations open at all times (a finished one is
replaced at once), each with a fixed output length (``ignore_eos``), so both tenants always
have work queued in the scheduler. Tokens are counted as their chunks arrive, only inside the
steady window ``[start + warmup_s, start + warmup_s + window_s)``; at the window's end every
open call is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import grpc

from sluice.v1 import common_pb2, inference_pb2, inference_pb2_grpc

GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]


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


@dataclass
class TenantLoad:
    """What one tenant got inside the window."""

    tokens: int = 0
    completed: int = 0
    ttft_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


def generate_request(model: str, prompt: str, max_new_tokens: int) -> inference_pb2.GenerateRequest:
    """A REALTIME request of exactly ``max_new_tokens`` tokens that skips the response cache."""
    return inference_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        options=common_pb2.GenerationOptions(max_new_tokens=max_new_tokens, ignore_eos=True),
        workload_class=common_pb2.WORKLOAD_CLASS_REALTIME,
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
            if time.monotonic() < end:
                into.errors[exc.code().name] += 1
                await asyncio.sleep(0.05)  # an error loop must not spin
        finally:
            call.cancel()


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
                "errors": dict(load.errors),
            }
            for t, load in loads.items()
        },
    }


def main(spec: LoadSpec, started: Event, out: Queue[dict[str, Any]]) -> None:
    """Process entry point: run the load, put its result (or the error) on ``out``."""
    try:
        out.put(asyncio.run(run(spec, started)))
    except BaseException as exc:
        started.set()
        out.put({"error": repr(exc)})
        raise
