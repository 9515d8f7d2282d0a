"""Load runs for ``make bench-vllm``: the overload benchmark's :class:`Benchmark` (capacity
search, levels, runs keyed by server and rate) with each server's target chosen by name, so the
bare vLLM server is driven over HTTP (:mod:`bench.load.openai_target`) and Sluice through its
SDK, under the same scenario, arrivals and windows.

:meth:`TargetBenchmark.target` is the only change: :class:`Benchmark` runs every load through
it, and :func:`bench.load.run.make_target` knows ``sluice`` and ``naive`` only. Both servers'
phases of a scenario run up together and in turns through :func:`bench.overload.paired.
run_paired`; :func:`level_plan` says the levels are of bare vLLM's capacity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from bench.load.openai_target import openai_target
from bench.load.run import make_target
from bench.load.scenario import Scenario
from bench.load.targets import Target
from bench.overload.benchmark import Benchmark
from bench.overload.options import Options
from bench.overload.paired import multiples_plan
from bench.overload.search import SearchResult
from bench.overload.servers import Server
from bench.slo.figures import OVERLOAD_MULTIPLES
from bench.vllm.servers import VLLM_SERVER

TargetFactory = Callable[[str, Scenario, str], Target]
"""``(server name, scenario, address)`` → the target to drive that server with."""


def target_factory(keys: Mapping[str, str]) -> TargetFactory:
    """The bare vLLM server through the OpenAI target, any other server as
    :func:`bench.load.run.make_target` reaches it (Sluice with the tenants' ``keys``)."""

    def make(name: str, scenario: Scenario, address: str) -> Target:
        if name == VLLM_SERVER:
            return openai_target(scenario, address)
        return make_target(name, scenario, address, keys)

    return make


class TargetBenchmark(Benchmark):
    """:class:`Benchmark` whose runs reach each server through ``make`` (module doc)."""

    def __init__(
        self, scenario: Scenario, keys: dict[str, str], options: Options, make: TargetFactory
    ) -> None:
        super().__init__(scenario, keys, options)
        self.make = make

    def target(self, server: Server, scenario: Scenario) -> Target:
        """The target ``make`` gives for ``server`` (bare vLLM over HTTP, Sluice through its
        SDK); every run of :class:`Benchmark` goes through it (its warm-up too)."""
        return self.make(server.name, scenario, server.address)


def level_plan(search: SearchResult, start_rps: float) -> list[tuple[float, str]]:
    """The overload levels both servers run: 2x and 4x bare vLLM's capacity at SLO, or of the
    lowest rate its search probed when none met the SLO (the labels say which)."""
    return multiples_plan(
        search, start_rps, OVERLOAD_MULTIPLES, "bare vLLM's capacity",
        "the lowest rate probed on bare vLLM",
    )  # fmt: skip
