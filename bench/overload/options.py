"""How the overload benchmark runs: :class:`Options`, one field per command-line flag."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """How the benchmark runs (flags of the same names, see ``--help``)."""

    step_s: float = 45.0
    """Arrival window of each run, unless ``min_requests`` needs longer."""
    min_requests: int = 15
    """Requests a search step should hold, on average and in its seeded plan: slow rates and
    short draws get longer windows."""
    level_min_requests: int = 25
    """Requests a load level should hold on average (a shorter search step at the same rate
    is measured again, longer, so tail latencies rest on more samples)."""
    max_step_s: float = 300.0
    """Longest window; with ``min_requests`` it sets the lowest rate the search probes (0.05
    req/s: the naive server's 0.1 req/s step can miss 95 % on one slow request of 13)."""
    realtime_min_requests: int = 16
    """REALTIME requests (all realtime tenants together) the level at 1x the naive capacity must
    hold, on average and in its seeded plan: its REALTIME TTFT p99s are compared (0: no such
    lengthening)."""
    max_level_s: float = 900.0
    """Longest window of that level (it may exceed ``max_step_s``)."""
    drain_s: float | None = None
    """Override of the scenario's drain (wait for requests in flight after the window)."""
    settle_s: float = 2.0
    """Pause between runs."""
    naive_start_rps: float = 0.2
    """First rate the naive search probes (Sluice's starts at the naive capacity)."""
    search_factor: float = 2.0
    """Rate multiplier between search steps."""
    refine_steps: int = 2
    """Geometric midpoints probed once the capacity is bracketed."""
    max_search_steps: int = 7
    """Most runs one search makes."""
    required_attainment: float = 0.95
    """Share of requests that must meet the SLO for a rate to pass."""
    naive_multiples: tuple[float, ...] = (1.0, 2.0, 4.0)
    """Levels offered to both targets, as multiples of the naive capacity."""
    own_multiples: tuple[float, ...] = (1.0, 2.0, 4.0)
    """Levels offered to Sluice, as multiples of its own capacity."""
    warmup_requests: int = 3
    """Unmeasured requests sent to each target before its first run."""
    time_budget_s: float = 0.0
    """Skip runs that would end past this many seconds (0: no limit)."""
    node_max_sequences: int = 16
    """Batch cap of Sluice's node, sized to the scenario's SLO as an operator would: a full
    batch must decode within the TPOT SLO (``docs/decisions/bench-overload-node-batch-cap.md``)."""
