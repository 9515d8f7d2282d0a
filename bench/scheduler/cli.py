"""Scheduler figures on the real suite, in one run: overhead, refusal latency, fairness and
isolation.

``python -m bench.scheduler`` (``make bench-scheduler``) starts etcd, Redis, one inference node
with the tiny seeded Llama (``tiny-random-llama``, so model time is small and steady) and a
scheduler, as child processes on free loopback ports (``bench.scheduler_suite``), and measures:

1. **Overhead.** Time to first token of the same small request sent straight to the node's
   ``Node.Generate`` and through the scheduler's ``Inference.Generate``, sequentially over warm
   channels, the paths interleaved (rotated each round). Through the scheduler twice: for a
   tenant without quotas and for one with (generous) quotas, whose requests each pay the Redis
   check. For scale, the same node behind a bare Python gRPC pass-through hop (in this
   process). Headline: p50 through the scheduler (with quotas) minus p50 straight to the node.
2. **Refusal latency**, client-side from call to error, over a warm channel: over-quota
   refusals (a tenant allowed one request per 100 s) on the idle suite and again while the node
   is saturated, and unmeetable-deadline refusals (``OVERLOADED``: a deadline shorter than the
   predicted wait) while the node is saturated. Headline: the worst of the three p99s. The
   scheduler's own handler times and its quota-backend timeouts are read from its log. For
   scale, the same probes time ``bench.refusal_floor`` in the same phases (idle, then in turn
   with the saturated probes): a bare gRPC server beside the scheduler, on its CPUs and event
   loop, that refuses every call with the same status and does nothing else.
3. **Fairness.** Tenants A (weight 2) and B (weight 1), both REALTIME, each keep more
   requests in flight than the node can run (closed loop, fixed output length, in a separate
   process: ``bench.scheduler_load``; a worker refused with a retry delay, such as past the
   REALTIME queue-wait bound, comes back after it); output tokens delivered per tenant over a
   steady window
   give the share ratio (target 2:1 within 10 %) and Jain's index of the weight-normalised
   shares (target ≥ 0.95). The refusal probes of (2) run during this window.
4. **Isolation.** Tenants ``victim`` and ``flooder`` (weight 1 each, REALTIME, no quotas: half
   the node each) send open-loop Poisson arrivals (seeded; ``bench.scheduler_load``, again in
   its own process), ``--isolation-tokens`` output tokens each under a
   ``--isolation-deadline-s`` deadline. Capacity (completed requests per second) is the
   fairness phase's when the output lengths match, else measured closed-loop for
   ``--capacity-window-s``. Phase *calm*: both tenants at 0.25 x capacity; phase *flood*: the
   victim the same (the same arrival schedule), the flooder at 10 x its share (5 x capacity,
   at most ``--isolation-max-rate``); ``--isolation-window-s`` each. The phases alternate in
   ``--isolation-rounds`` rounds (calm, flood, calm, flood, ...; each block after its own
   warm-up) whose blocks are merged per phase, so that a slow stretch of a shared machine
   weighs on both alike. Headline: the victim's TTFT p99 in flood over its p99 in calm
   (target ≤ 1.2), where a victim arrival that got no first token (refused, failed) counts as
   infinitely late. The flooder's outcomes (served, refused by reason) are reported with it.
   Each phase lasts 300 s by default (about 500 victim requests): the p99 of a phase is set by
   its few slowest requests, which come in clusters (a burst of the victim's own arrivals
   waiting for a slot, in either phase), so shorter phases measure chance more than the
   scheduler. On a discrete-event model of this load (``bench.isolation_model``: the real
   queues and slot shares), the ratio of 30 seeded runs spread over 0.62-1.29 (p10-p90) with
   90-s phases and 0.66-0.95 with 300-s phases, around a long-run value of about 0.75.

CPU placement: unless ``--shared-cpus`` is given (or the machine has one CPU), the node gets the
last CPU to itself and this process, and so the stores and the scheduler it starts, the others;
the load processes of (3) and (4) move themselves onto the node's CPU. The scheduler's CPUs are
then left to the scheduler, the stores and the probes and overhead calls timed here, as in a
deployment where the scheduler has its own CPU and the clients run elsewhere; the load competes
with the model instead, which lowers the measured capacity but not the scheduler's latency.
``--shared-cpus`` lets every process use every CPU.

Writes ``bench/results/scheduler.json`` and ``scheduler.md`` with only this run's figures; the
report flags a run in which the scheduler lost the node (a ``node_removed`` line in its log:
the node's registry lease lapsed, as when something else starves its CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from bench.scheduler_isolation import SETTLE_BEFORE_CALM_S, measure_isolation
from bench.scheduler_load import LoadSpec, generate_request, load_process
from bench.scheduler_report import (
    REFUSAL_KINDS,
    finite,
    jain_index,
    markdown,
    node_removals,
    percentile,
    print_table,
    server_side_refusals,
    targets,
)
from bench.scheduler_suite import (
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
from sluice.runtime.runner import settle_heap
from sluice.sdk.errors import QuotaExceeded, from_rpc_error
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
    node_p50 = percentile(ttft["node"], 50)
    return {
        "rounds": rounds,
        "max_new_tokens": max_new_tokens,
        "ttft_s": {
            name: {
                "p50": percentile(v, 50),
                "p99": percentile(v, 99),
                "mean": statistics.fmean(v) if v else math.nan,
            }
            for name, v in ttft.items()
        },
        "overhead_p50_s": percentile(ttft["scheduler_quota"], 50) - node_p50,
        "overhead_no_quota_p50_s": percentile(ttft["scheduler"], 50) - node_p50,
        "passthrough_p50_s": percentile(ttft["passthrough"], 50) - node_p50,
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
            "p50_s": percentile(self.latencies_s, 50),
            "p99_s": percentile(self.latencies_s, 99),
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
        outcome = "QUOTA" if isinstance(error, QuotaExceeded) else error.reason or error.code.name
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
        "jain_index": jain_index(normalised),
        "output_tokens_per_s": (a + b) / args.window_s,
        "tenants": {
            t: {
                "tokens": v["tokens"],
                "completed": v["completed"],
                "ttft_p50_s": percentile(v["ttft_s"], 50),
                "ttft_p99_s": percentile(v["ttft_s"], 99),
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


def build_result(
    measured: dict[str, Any],
    args: argparse.Namespace,
    load: list[float],
    node_cpus: frozenset[int],
    node_removed_at: list[str],
    speed: tuple[float, float] = (math.nan, math.nan),
) -> Any:
    """Headline figures, verdicts, every measured detail and the setup."""
    refused, fairness = measured["refusals"], measured["fairness"]
    figures: dict[str, Any] = {
        "overhead_ttft_p50_s": measured["overhead"]["overhead_p50_s"],
        "refusal_p99_s": max(refused[k]["p99_s"] for k in REFUSAL_KINDS),
        "fairness_jain": fairness["jain_index"],
        "share_ratio_a_to_b": fairness["share_ratio_a_to_b"],
        "isolation_ttft_p99_ratio": measured["isolation"]["victim_ttft_p99_ratio"],
    }
    return {
        **figures,
        "targets": targets(figures, WEIGHTS[TENANT_A] / WEIGHTS[TENANT_B]),
        **measured,
        "setup": {
            "command": "python -m bench.scheduler",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": MODEL,
            "node_max_sequences": args.max_sequences,
            "cpus": os.cpu_count(),
            "node_and_load_cpus": sorted(node_cpus),
            "cpu_placement": cpu_placement(node_cpus),
            "node_removed_at": node_removed_at,
            "machine": platform.processor() or platform.machine(),
            "load_average_start_end": [load, [round(x, 2) for x in os.getloadavg()]],
            "cpu_loop_s_start_end": list(speed),
        },
    }


def cpu_loop_s(rounds: int = 5) -> float:
    """Seconds one fixed pure-Python loop takes on this process's CPU, best of ``rounds``:
    the machine's speed at the time, to compare runs by. On the shared 2-core test VM it
    took 0.05-0.06 s at most times and 0.11 s in a slow stretch, and every latency measured
    here moved with it."""
    best = math.inf
    for _ in range(rounds):
        began = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i * i
        best = min(best, time.perf_counter() - began)
    return best


def cpu_placement(node_cpus: frozenset[int]) -> str:
    """Who ran where, in words."""
    if not node_cpus:
        return "every process shares every CPU"
    listed = ", ".join(str(c) for c in sorted(node_cpus))
    return (
        f"the node and the load processes on CPU {listed}, the scheduler, the stores and the "
        "timed probe calls on the others"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--run-dir", type=Path, default=Path(".sluice/bench/scheduler"))
    p.add_argument("--max-sequences", type=int, default=4, help="node capacity")
    p.add_argument("--overhead-requests", type=int, default=200, help="rounds of the 4 paths")
    p.add_argument("--overhead-tokens", type=int, default=4)
    p.add_argument("--quota-probes", type=int, default=200, help="idle over-quota probes")
    p.add_argument("--in-flight", type=int, default=8, help="per fairness tenant")
    p.add_argument("--fair-tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument(
        "--window-s",
        type=float,
        default=60.0,
        help="fairness window, with the saturated refusal probes in it (about 800 of them)",
    )
    p.add_argument(
        "--probe-interval-s",
        type=float,
        default=0.075,
        help="one round of saturated probes (deadline, quota, floor) per interval",
    )
    p.add_argument("--probe-deadline-s", type=float, default=0.05)
    p.add_argument(
        "--isolation-window-s", type=float, default=300.0, help="per phase, all rounds together"
    )
    p.add_argument(
        "--isolation-rounds",
        type=int,
        default=3,
        help="the calm and flood phases alternate in this many rounds of equal blocks",
    )
    p.add_argument(
        "--isolation-settle-s",
        type=float,
        default=SETTLE_BEFORE_CALM_S,
        help="idle before each calm block (past the scheduler's memory of the tenants' demand)",
    )
    p.add_argument("--isolation-tokens", type=int, default=256, help="output tokens per request")
    p.add_argument("--isolation-deadline-s", type=float, default=10.0, help="per request")
    p.add_argument(
        "--isolation-max-rate", type=float, default=150.0, help="cap on the flood, requests/s"
    )
    p.add_argument(
        "--capacity-window-s",
        type=float,
        default=30.0,
        help="closed-loop capacity window, when isolation and fairness token counts differ",
    )
    p.add_argument("--seed", type=int, default=1, help="seeds the isolation arrivals")
    p.add_argument(
        "--shared-cpus",
        action="store_true",
        help="let every process use every CPU (default: the node and the load processes get "
        "the last CPU, the rest run the scheduler, the stores and the timed probes)",
    )
    args = p.parse_args(argv)
    if args.isolation_rounds < 1:
        p.error("--isolation-rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = [round(x, 2) for x in os.getloadavg()]
    node_cpus: frozenset[int] = frozenset()
    cpus = sorted(os.sched_getaffinity(0))
    if not args.shared_cpus and len(cpus) >= 2:
        node_cpus = frozenset(cpus[-1:])
        os.sched_setaffinity(0, cpus[:-1])  # inherited by the stores and the scheduler
    speed_start = cpu_loop_s()
    suite = BenchSuite(
        args.run_dir.resolve(), max_sequences=args.max_sequences, node_cpus=node_cpus
    )
    try:
        suite.start()
        settle_heap()  # as the services do: no full collections over start-up objects mid-run
        measured, saturated_from = asyncio.run(measure(suite, args))
    finally:
        suite.stop()
    measured["refusals"]["server_side"] = server_side_refusals(
        suite.scheduler_log, saturated_from, {PROBE, LIMITED}
    )
    removed = node_removals(suite.scheduler_log)
    speed = (speed_start, cpu_loop_s())
    result = build_result(measured, args, load, node_cpus, removed, speed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scheduler.json").write_text(json.dumps(finite(result), indent=2) + "\n")
    (args.out_dir / "scheduler.md").write_text(markdown(result))
    print_table(result)
    print(f"results in {args.out_dir / 'scheduler.json'} and {args.out_dir / 'scheduler.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
