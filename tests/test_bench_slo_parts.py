"""``make bench-slo``'s parts beside the suites: the refusal floor (a real bare refusal server
probed from a run's loop), the observers held together, the report's line for it, and the
default arm's level plan, and the sampler's scrape of the scheduler's signals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from bench.jobs.metrics import scrape, total
from bench.load.run import run_client
from bench.overload.search import SearchResult, SearchStep
from bench.slo import cli as slo
from bench.slo.floor import Observers, RefusalFloor
from bench.slo.report import _refusal_text
from bench.slo.signals import SAMPLED
from scheduler.metrics import LiveState, NodeGaugeRow, SchedulerMetrics


def test_the_floor_is_probed_through_a_run_and_stopped_by_its_pid(tmp_path: Path) -> None:
    floor = RefusalFloor(tmp_path / "floor.log")
    floor.start()
    proc = floor._proc
    assert proc is not None
    try:

        async def run(key: tuple[str, float, int]) -> None:
            with floor.watch(key):
                await asyncio.sleep(0.6)

        run_client(run(("default", 2.0, 0)))
        run_client(run(("default", 2.0, 1)))
        run_client(run(("default", 4.0, 0)))
    finally:
        floor.stop()
    assert proc.poll() is not None  # gone, by its PID
    first, second = floor.times[("default", 2.0, 0)], floor.times[("default", 2.0, 1)]
    assert len(first) >= 3 and len(second) >= 3 and all(0 < t < 1 for t in first)
    pooled = floor.summary([("default", 2.0, 0), ("default", 2.0, 1)])
    assert pooled is not None and pooled["count"] == len(first) + len(second)
    assert 0 < pooled["p50_s"] <= pooled["p99_s"] < 1
    assert floor.summary([("reference", 2.0, 0)]) is None


def test_observers_hold_every_context_through_the_run_in_order() -> None:
    said: list[str] = []

    class Watcher:
        def __init__(self, name: str) -> None:
            self.name = name

        @contextlib.contextmanager
        def watch(self, key: tuple[str, float, int]) -> Iterator[None]:
            said.append(f"{self.name} in {key[1]:g}")
            yield
            said.append(f"{self.name} out")

    with Observers(Watcher("a"), Watcher("b")).watch(("default", 1.0, 0)):
        said.append("run")
    assert said == ["a in 1", "b in 1", "run", "b out", "a out"]


def test_the_refusal_figure_says_the_floor_of_its_level() -> None:
    level = {
        "refusals": {"count": 290, "p99_s": 0.0098},
        "floor": {"count": 800, "p50_s": 0.002, "p99_s": 0.0071},
    }
    assert _refusal_text("9.8 ms", level) == (
        "9.8 ms (290 refusals; bare floor 7.1 ms over 800 probes)"
    )
    assert _refusal_text("–", {**level, "refusals": {"count": 0, "p99_s": None}}) == (
        "none refused (bare floor 7.1 ms over 800 probes)"
    )
    assert _refusal_text("–", {"refusals": {"count": 0, "p99_s": None}}) == "none refused"
    assert _refusal_text("5.0 ms", {"refusals": {"count": 4, "p99_s": 0.005}, "floor": None}) == (
        "5.0 ms (4 refusals)"
    )


def test_the_default_arms_levels_are_multiples_of_its_capacity_or_its_lowest_probe() -> None:
    found = SearchResult(1.4142, [SearchStep(1.4142, 0.97, True)])
    assert slo.level_plan(found, 0.5) == [
        (1.4142, "1x capacity"), (2.8284, "2x capacity"), (5.6568, "4x capacity"),
    ]  # fmt: skip
    none = SearchResult(0.0, [SearchStep(0.5, 0.2, False), SearchStep(0.25, 0.6, False)])
    assert [rate for rate, _ in slo.level_plan(none, 0.5)] == [0.25, 0.5, 1.0]
    assert "no capacity at SLO found" in slo.level_plan(none, 0.5)[0][1]


def test_the_sampler_asks_the_server_for_its_signals_only() -> None:
    """A real exposition server (the scheduler's kind) answers a scrape naming its samples
    with those alone, a histogram's ``_count`` and ``_sum`` included."""
    registry = CollectorRegistry()
    metrics = SchedulerMetrics(registry)
    metrics.bind(
        LiveState(
            lambda: {("realtime", "A"): 2},
            lambda: [NodeGaugeRow("n1", "closed", False, 0.5, 3, 40.0)],
        )
    )
    metrics.predicted_wait.labels("realtime").observe(0.5)
    metrics.ttft.labels("realtime").observe(0.5)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        every = scrape(address)
        only = scrape(address, names=SAMPLED)
    finally:
        server.shutdown()
        thread.join(5)
    assert every is not None and only is not None
    assert {name for name, _ in only} == {
        "sluice_scheduler_predicted_queue_wait_seconds_count",
        "sluice_scheduler_predicted_queue_wait_seconds_sum",
        "sluice_scheduler_node_tokens_in_flight",
        "sluice_scheduler_node_sequences",
        "sluice_scheduler_queue_depth",
    }, "the live gauges too (their collector describes them)"
    assert total(only, "sluice_scheduler_node_tokens_in_flight") == 40.0
    assert only.items() <= every.items() and len(every) > 5 * len(only)
