"""The overhead, refusal and fairness phases of ``bench.scheduler`` against the running suite
(:func:`measure` runs every phase in order, the isolation phase last: :mod:`.isolation`).

- Overhead: TTFT of the same small request straight to the node, through the scheduler with
  and without quotas, and through a bare Python gRPC pass-through hop; sequential over warm
  channels, the paths rotated each round.
- Refusals: client-side time from call to error over a warm channel, over-quota refusals idle
  and saturated, unmeetable-deadline refusals saturated; the refusal floor
  (:mod:`.refusal_floor`) is probed between them in the same phases.
- Fairness: tenants A (weight 2) and B (weight 1) keep more requests in flight than the node
  runs (closed loop in its own process, :mod:`.load`); the saturated refusal probes run then.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc

from bench.scheduler.isolation import measure_isolation
from bench.scheduler.load import LoadSpec, generate_request, load_process
from bench.scheduler.report import rank_percentile
from bench.scheduler.suite import (
    GRPC_OPTIONS,
    LIMITED,
    METERED,
    MODEL,
    PROBE,
    TENANT_A,
    TENANT_B,
    WEIGHTS,
    BenchSuite,
)
from bench.stats import jain_index
from sluice import QuotaExceededError
from sluice.sdk.errors import from_rpc_error
from sluice.v1 import inference_pb2, inference_pb2_grpc, node_pb2, node_pb2_grpc

OVERHEAD_PROMPT = "Say hello to the scheduler benchmark."


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


# -- measurements ---------------------------------------------------------------------------


async def time_to_first_chunk(start: Callable[[], Any]) -> float:
    """Seconds from starting the call to its first chunk; the stream is read to its end."""
    began = time.perf_counter()
    first = math.nan
    async for _chunk in start():
        if math.isnan(first):
            first = time.perf_counter() - began
    return first


class Passthrough(node_pb2_grpc.NodeServicer):
    """``Node.Generate`` forwarded as is: the cost of one bare Python gRPC hop, for scale."""

    def __init__(self, node: node_pb2_grpc.NodeStub) -> None:
        self._node = node

    async def Generate(
        self, request: node_pb2.NodeGenerateRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async for chunk in self._node.Generate(request, timeout=30):
            yield chunk


@dataclass
class Paths:
    """Stubs over warm channels: the scheduler's public API, the node's, the node's behind a
    bare pass-through hop, and the refusal floor's."""

    inference: inference_pb2_grpc.InferenceStub
    node: node_pb2_grpc.NodeStub
    passthrough: node_pb2_grpc.NodeStub
    keys: dict[str, str]
    refusal_floor: inference_pb2_grpc.InferenceStub

    def floor(self, req: inference_pb2.GenerateRequest) -> Callable[[], Any]:
        """A call to the refusal floor: the same request and metadata as a scheduler call."""
        return lambda: self.refusal_floor.Generate(
            req, metadata=auth(self.keys[LIMITED]), timeout=30
        )

    def via_scheduler(self, tenant: str, req: inference_pb2.GenerateRequest) -> Callable[[], Any]:
        return lambda: self.inference.Generate(req, metadata=auth(self.keys[tenant]), timeout=30)

    def straight(
        self, req: inference_pb2.GenerateRequest, node: node_pb2_grpc.NodeStub
    ) -> Callable[[], Any]:
        def start() -> Any:
            forward = node_pb2.NodeGenerateRequest(
                request=req, tenant=PROBE, request_id=uuid.uuid4().hex
            )
            return node.Generate(forward, timeout=30)

        return start


async def measure_overhead(paths: Paths, rounds: int, max_new_tokens: int) -> dict[str, Any]:
    """TTFT per path over ``rounds`` interleaved rounds (after a short warm-up)."""
    req = generate_request(MODEL, OVERHEAD_PROMPT, max_new_tokens)
    starts = {
        "node": paths.straight(req, paths.node),
        "scheduler": paths.via_scheduler(PROBE, req),
        "scheduler_quota": paths.via_scheduler(METERED, req),
        "passthrough": paths.straight(req, paths.passthrough),
    }
    names = list(starts)
    for _ in range(5):
        for name in names:
            await time_to_first_chunk(starts[name])
    ttft: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            ttft[name].append(await time_to_first_chunk(starts[name]))
    node_p50 = rank_percentile(ttft["node"], 50)
    return {
        "rounds": rounds,
        "max_new_tokens": max_new_tokens,
        "ttft_s": {
            name: {
                "p50": rank_percentile(v, 50),
                "p99": rank_percentile(v, 99),
                "mean": statistics.fmean(v) if v else math.nan,
            }
            for name, v in ttft.items()
        },
        "overhead_p50_s": rank_percentile(ttft["scheduler_quota"], 50) - node_p50,
        "overhead_no_quota_p50_s": rank_percentile(ttft["scheduler"], 50) - node_p50,
        "passthrough_p50_s": rank_percentile(ttft["passthrough"], 50) - node_p50,
    }


@dataclass
class Refusals:
    """Client-side latencies of one kind of refusal; calls that were not refused as
    expected are counted by what happened instead."""

    expect: str
    latencies_s: list[float]
    other: dict[str, int]
    without_retry_info: int = 0

    def record(self, elapsed: float, outcome: str, retry_info: bool) -> None:
        if outcome == self.expect:
            self.latencies_s.append(elapsed)
            self.without_retry_info += not retry_info
        else:
            self.other[outcome] = self.other.get(outcome, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "refusals": len(self.latencies_s),
            "p50_s": rank_percentile(self.latencies_s, 50),
            "p99_s": rank_percentile(self.latencies_s, 99),
            "max_s": max(self.latencies_s, default=math.nan),
            "without_retry_info": self.without_retry_info,
            "not_refused": self.other,
        }


def refusals(expect: str) -> Refusals:
    return Refusals(expect, [], {})


async def probe(start: Callable[[], Any], into: Refusals) -> None:
    """One call expected to be refused: time to its error, classified."""
    began = time.perf_counter()
    call = start()
    try:
        async for _chunk in call:
            into.record(time.perf_counter() - began, "served", False)
            return
        into.record(time.perf_counter() - began, "served", False)
    except grpc.aio.AioRpcError as exc:
        elapsed = time.perf_counter() - began
        error = from_rpc_error(exc)
        quota = isinstance(error, QuotaExceededError)
        outcome = "QUOTA" if quota else error.reason or error.code.name
        into.record(elapsed, outcome, error.retry_after_s is not None)
    finally:
        call.cancel()


async def measure_fairness(
    paths: Paths, address: str, cpus: frozenset[int], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Refusals]]:
    """The 2:1 load in its own process; meanwhile, refusal probes from this one, the floor's
    between the scheduler's. Every refusal from here on counts as one under saturation."""
    spec = LoadSpec(
        address=address,
        keys={TENANT_A: paths.keys[TENANT_A], TENANT_B: paths.keys[TENANT_B]},
        model=MODEL,
        in_flight=args.in_flight,
        max_new_tokens=args.fair_tokens,
        warmup_s=args.warmup_s,
        window_s=args.window_s,
        cpus=cpus,
    )
    saturated = {
        "deadline_saturated": refusals("OVERLOADED"),
        "quota_saturated": refusals("QUOTA"),
        "floor_saturated": refusals("OVERLOADED"),
    }
    async with load_process(spec, args.window_s + 120) as result:
        window_end = time.monotonic() + args.warmup_s + args.window_s
        await asyncio.sleep(args.warmup_s)
        # Longest output the model allows: with it, all the queued work counts ahead of the
        # probe, so its predicted wait is what the saturated node has queued.
        unmeetable = generate_request(MODEL, "probe", 1024)
        quota_req = generate_request(MODEL, "probe", 4)
        starts: dict[str, Callable[[], Any]] = {
            "deadline_saturated": lambda: paths.inference.Generate(
                unmeetable, metadata=auth(paths.keys[PROBE]), timeout=args.probe_deadline_s
            ),
            "quota_saturated": paths.via_scheduler(LIMITED, quota_req),
            "floor_saturated": paths.floor(quota_req),
        }
        gap = args.probe_interval_s / len(starts)
        while time.monotonic() < window_end - args.probe_interval_s:
            for kind, start in starts.items():
                await probe(start, saturated[kind])
                await asyncio.sleep(gap)
        loaded = await result()
    return fairness_figures(loaded, args), saturated


def fairness_figures(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    tenants = result["tenants"]
    a, b = tenants[TENANT_A]["tokens"], tenants[TENANT_B]["tokens"]
    normalised = [a / WEIGHTS[TENANT_A], b / WEIGHTS[TENANT_B]]
    return {
        "in_flight_per_tenant": args.in_flight,
        "max_new_tokens": args.fair_tokens,
        "warmup_s": args.warmup_s,
        "window_s": args.window_s,
        "weights": {TENANT_A: WEIGHTS[TENANT_A], TENANT_B: WEIGHTS[TENANT_B]},
        "share_ratio_a_to_b": a / b if b else math.inf,
        "jain_index": jain_index(normalised, undefined=math.nan),
        "output_tokens_per_s": (a + b) / args.window_s,
        "tenants": {
            t: {
                "tokens": v["tokens"],
                "completed": v["completed"],
                "ttft_p50_s": rank_percentile(v["ttft_s"], 50),
                "ttft_p99_s": rank_percentile(v["ttft_s"], 99),
                "refused": v["refused"],
                "errors": v["errors"],
            }
            for t, v in tenants.items()
        },
    }


async def measure(suite: BenchSuite, args: argparse.Namespace) -> tuple[dict[str, Any], datetime]:
    """Every phase, in order, against the running suite; also returns when saturation began."""
    node_stub = node_pb2_grpc.NodeStub
    passthrough = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    async with (
        grpc.aio.insecure_channel(suite.scheduler_address, options=GRPC_OPTIONS) as sched,
        grpc.aio.insecure_channel(suite.node_address, options=GRPC_OPTIONS) as node,
        grpc.aio.insecure_channel(suite.floor_address, options=GRPC_OPTIONS) as floor,
    ):
        node_pb2_grpc.add_NodeServicer_to_server(Passthrough(node_stub(node)), passthrough)
        port = passthrough.add_insecure_port("127.0.0.1:0")
        await passthrough.start()
        hop = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        paths = Paths(
            inference_pb2_grpc.InferenceStub(sched),
            node_stub(node),
            node_stub(hop),
            suite.keys,
            inference_pb2_grpc.InferenceStub(floor),
        )
        try:
            overhead = await measure_overhead(paths, args.overhead_requests, args.overhead_tokens)
        finally:
            await hop.close()
            await passthrough.stop(0)
        quota_req = generate_request(MODEL, "probe", 4)
        await time_to_first_chunk(paths.via_scheduler(LIMITED, quota_req))  # its one request
        idle = {"quota_idle": refusals("QUOTA"), "floor_idle": refusals("OVERLOADED")}
        for _ in range(args.quota_probes):
            await probe(paths.via_scheduler(LIMITED, quota_req), idle["quota_idle"])
            await probe(paths.floor(quota_req), idle["floor_idle"])
        saturated_from = datetime.now(UTC)
        fairness, saturated = await measure_fairness(
            paths, suite.scheduler_address, suite.node_cpus, args
        )
    isolation = await measure_isolation(suite, fairness, args)
    refused = {
        **{kind: r.summary() for kind, r in {**idle, **saturated}.items()},
        "probe_deadline_s": args.probe_deadline_s,
        "probe_interval_s": args.probe_interval_s,
        "saturated_probe_order": list(saturated),  # the order they took turns in
    }
    measured = {
        "overhead": overhead,
        "refusals": refused,
        "fairness": fairness,
        "isolation": isolation,
    }
    return measured, saturated_from
