"""A discrete-event model of ``make bench-scheduler``'s isolation phase, to see how its headline
behaves over many seeds: a model, not a measurement (the benchmark measures; this explains).

``python -m bench.scheduler.isolation_model`` runs the scheduler's own
:class:`~scheduler.queues.FairQueues`, :class:`~scheduler.shares.SlotShares` and
:class:`~scheduler.shares.DemandMeter` on a simulated clock with the dispatch rules of
:class:`~scheduler.gate.DispatchGate`, against a model node: ``--slots`` sequences batched
continuously, a step taking ``fixed + per_sequence * running``. A flooder arrival that finds
``--flood-queue`` of its requests queued is refused (admission's effect on the flood); TTFT is
the wait for a slot plus a fixed prefill; each phase starts from an empty scheduler. Per seed it
takes the victim's TTFT p99 flood / calm (the benchmark's headline) and prints the ratio's
spread (p10, p50, p90), how often it is at most 1.2 and the flooder's completed requests per
second, for each form of the burst headroom (``--policies``: ``burst``, what the scheduler
does; ``demand``; ``average``). Calibration and policies:
``docs/decisions/bench-isolation-model.md``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench.stats import percentile
from scheduler.admission import AdmissionConfig
from scheduler.queues import FairQueues, QueuedRequest
from scheduler.shares import DemandMeter, SlotShares
from sluice.contract import WorkloadClass

MODEL = "model"
REALTIME = WorkloadClass.REALTIME
VICTIM, FLOODER = "victim", "flooder"
POLICIES = ("burst", "demand", "average")


@dataclass(frozen=True)
class ModelNode:
    """The modelled node: ``slots`` sequences, continuous batching."""

    slots: int = 4
    step_fixed_s: float = 1.2e-3
    step_per_sequence_s: float = 0.25e-3
    prefill_s: float = 4e-3

    def step_s(self, running: int) -> float:
        return self.step_fixed_s + self.step_per_sequence_s * running

    def capacity(self, tokens: int) -> float:
        """Requests per second with every slot busy."""
        return self.slots / (tokens * self.step_s(self.slots) + self.prefill_s)


class Run:
    """One phase: the scheduler's queues and shares on a simulated clock."""

    def __init__(
        self,
        node: ModelNode,
        rates: dict[str, float],
        *,
        seed: int,
        tokens: int,
        policy: str,
        flood_queue: int,
    ) -> None:
        self.now = 0.0
        self.node = node
        self.rates = rates
        self.seed = seed
        self.tokens = tokens
        self.policy = policy
        self.flood_queue = flood_queue
        self.active_window_s = AdmissionConfig().active_window_s
        self.queues = FairQueues(self.clock, lambda _t: 1.0)
        self.shares = SlotShares(self.clock, lambda _t: 1.0)
        self.demand = DemandMeter(self.clock)
        self.running: list[tuple[QueuedRequest, list[int]]] = []
        self.seen: dict[str, float] = {}
        self.arrived_at: dict[str, float] = {}
        self.ttft: dict[str, list[float]] = {t: [] for t in rates}
        self.completed: dict[str, int] = dict.fromkeys(rates, 0)
        self._ids = itertools.count()
        self._measure_from = 0.0
        self._next_step_at = math.inf
        self._token_s = node.step_s(node.slots)

    def clock(self) -> float:
        return self.now

    def _active(self) -> set[str]:
        horizon = self.now - self.active_window_s
        recent = {t for t, at in self.seen.items() if at >= horizon}
        return recent | set(self.queues.tenants_with_cost(REALTIME, MODEL))

    def _may_start(self, tenant: str, queued: set[str]) -> bool:
        free = self.node.slots - len(self.running)
        if free <= 0:
            return False
        active = self._active()
        demand = waiting = None
        if self.policy in ("burst", "demand"):
            demand = self.demand.slots(MODEL, REALTIME, active | {tenant}, self._token_s)
        if self.policy == "burst":
            waiting = self.queues.waiting(REALTIME, MODEL)  # as the gate reads it
        return self.shares.may_start(
            MODEL,
            REALTIME,
            tenant,
            self.node.slots,
            free,
            active,
            queued=queued,
            demand=demand,
            waiting=waiting,
        )

    def _start(self, item: QueuedRequest) -> None:
        self.shares.started(MODEL, REALTIME, item.tenant)
        if not self.running:  # the node was idle: its next step starts now
            self._next_step_at = self.now + self.node.step_s(1)
        self.running.append((item, [self.tokens]))
        arrived = self.arrived_at.pop(item.request_id)
        if arrived >= self._measure_from:
            self.ttft[item.tenant].append(self.now - arrived + self.node.prefill_s)

    def _dispatch(self) -> None:
        while True:
            held: set[str] = set()
            queued = set(self.queues.tenants_with_cost(REALTIME, MODEL))

            def placeable(
                item: QueuedRequest, held: set[str] = held, queued: set[str] = queued
            ) -> bool:
                if item.tenant in held or len(self.running) >= self.node.slots:
                    return False
                if not self._may_start(item.tenant, queued):
                    held.add(item.tenant)
                    return False
                return True

            item = self.queues.pop(placeable)
            if item is None:
                return
            self._start(item)

    def _arrive(self, tenant: str) -> None:
        item = QueuedRequest(
            f"r{next(self._ids)}", tenant, REALTIME, MODEL, 20, self.tokens, math.inf
        )
        self.demand.arrived(item)
        if tenant == FLOODER and self.queues.depth(REALTIME, tenant) >= self.flood_queue:
            return  # refused by admission
        self.seen[tenant] = self.now
        self.arrived_at[item.request_id] = self.now
        if not self.queues and self._may_start(tenant, set()):
            self.queues.start_now(item)
            self._start(item)
            return
        self.queues.push(item)
        self._dispatch()

    def _step(self) -> None:
        step = self.node.step_s(len(self.running))
        self.now = self._next_step_at
        self._token_s = 0.99 * self._token_s + 0.01 * step
        done = []
        for item, left in self.running:
            left[0] -= 1
            self.queues.charge(item.tenant, REALTIME, 1.0)
            self.seen[item.tenant] = self.now
            if left[0] <= 0:
                done.append((item, left))
        for entry in done:
            self.running.remove(entry)
            item = entry[0]
            self.shares.ended(MODEL, REALTIME, item.tenant)
            self.demand.finished(item, self.tokens)
            if self.now >= self._measure_from:
                self.completed[item.tenant] += 1
        if done:
            self._dispatch()
        # The next step batches whatever runs now (including what the pass just started).
        running = len(self.running)
        self._next_step_at = self.now + self.node.step_s(running) if running else math.inf

    def run(self, warmup_s: float, window_s: float) -> Run:
        self._measure_from = warmup_s
        end = warmup_s + window_s
        rngs = {t: random.Random(f"{self.seed}:{t}") for t in self.rates}
        upcoming = {t: rngs[t].expovariate(r) for t, r in self.rates.items()}
        while self.now < end:
            tenant = min(upcoming, key=upcoming.__getitem__)
            if upcoming[tenant] <= self._next_step_at:
                self.now = upcoming[tenant]
                upcoming[tenant] = self.now + rngs[tenant].expovariate(self.rates[tenant])
                self._arrive(tenant)
            else:
                self._step()
        return self


@dataclass(frozen=True)
class Spread:
    policy: str
    ratios: list[float]
    flooder_per_s: float

    def row(self) -> str:
        r = sorted(self.ratios)
        p10, p50, p90 = (percentile(r, q) for q in (10, 50, 90))
        passed = sum(x <= 1.2 for x in r) / len(r)
        return (
            f"{self.policy:8} {p10:6.2f} {p50:6.2f} {p90:6.2f} {100 * passed:9.0f}%"
            f" {self.flooder_per_s:12.2f}"
        )


def spread(node: ModelNode, policy: str, args: argparse.Namespace) -> Spread:
    capacity = node.capacity(args.tokens)
    calm_rate = 0.25 * capacity
    ratios: list[float] = []
    served: list[float] = []
    for seed in range(args.seeds):
        phases = {}
        for phase, flood_rate in (("calm", calm_rate), ("flood", 5 * capacity)):
            phases[phase] = Run(
                node,
                {VICTIM: calm_rate, FLOODER: flood_rate},
                seed=seed,
                tokens=args.tokens,
                policy=policy,
                flood_queue=args.flood_queue,
            ).run(args.warmup_s, args.window_s)
        calm = percentile(phases["calm"].ttft[VICTIM], 99)
        flood = percentile(phases["flood"].ttft[VICTIM], 99)
        ratios.append(flood / calm)
        served.append(phases["flood"].completed[FLOODER] / args.window_s)
    return Spread(policy, ratios, statistics.fmean(served))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--window-s", type=float, default=300.0, help="per phase")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256, help="output tokens per request")
    p.add_argument("--step-fixed-ms", type=float, default=1.2, help="decode step, fixed part")
    p.add_argument(
        "--step-per-sequence-ms", type=float, default=0.25, help="decode step, per sequence"
    )
    p.add_argument("--flood-queue", type=int, default=8, help="flooder requests queued at most")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    node = ModelNode(args.slots, args.step_fixed_ms / 1000, args.step_per_sequence_ms / 1000)
    print(
        f"{args.seeds} seeds, {args.window_s:.0f}-s phases, capacity "
        f"{node.capacity(args.tokens):.2f} req/s; victim TTFT p99 flood / calm:"
    )
    print(f"{'headroom':8} {'p10':>6} {'p50':>6} {'p90':>6} {'<= 1.2':>10} {'flooder/s':>12}")
    for policy in args.policies:
        print(spread(node, policy, args).row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
