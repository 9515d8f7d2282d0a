"""``make bench-vllm``'s figures (issue 20, deliverable 4), pure so they are tested without
servers.

- *Capacity at SLO* of each server: the overload benchmark's search (the highest offered rate
  at which >= 95 % of all requests meet the scenario's SLO). Sluice + vLLM's must be at least
  ``CAPACITY_RATIO_TARGET`` (0.9) of bare vLLM's: Sluice's scheduling may cost a little
  throughput, not more.
- At 2x and 4x *bare vLLM's* capacity, both servers under the same arrivals: per class the
  figures of :func:`bench.slo.figures.class_figures` (SLO attainment of the admitted, goodput,
  refusals, tails). Sluice + vLLM must keep REALTIME attainment of the admitted at
  ``ATTAINMENT_TARGET`` (95 %) or more; bare vLLM's is reported beside it, and whether it fell
  below the target there. REALTIME attainment over all its requests, refused ones included, is
  reported too: an admission that refuses REALTIME shows there, not in the verdict's figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.slo.figures import ATTAINMENT_TARGET

CAPACITY_RATIO_TARGET = 0.9
REALTIME = "realtime"


def capacity_verdict(sluice_rps: float | None, bare_rps: float | None) -> dict[str, Any]:
    """Sluice + vLLM's capacity at SLO against bare vLLM's (None: not measured)."""
    ratio = sluice_rps / bare_rps if sluice_rps is not None and bare_rps else None
    return {
        "sluice_rps": sluice_rps,
        "bare_rps": bare_rps,
        "ratio": ratio,
        "target": CAPACITY_RATIO_TARGET,
        "pass": bool(sluice_rps) and ratio is not None and ratio >= CAPACITY_RATIO_TARGET,
    }


def realtime_attainment(
    classes: Mapping[str, Mapping[str, Any]] | None,
) -> tuple[float | None, float | None]:
    """REALTIME SLO attainment of the admitted, and over all its requests; None where there
    were none (or no run)."""
    rt = (classes or {}).get(REALTIME)
    if not rt:
        return None, None
    requests = rt["requests"]
    return rt["attainment_admitted"], (rt["met_slo"] / requests if requests else None)


def level_verdict(
    sluice: Mapping[str, Mapping[str, Any]] | None, bare: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, Any]:
    """The figure at one overload level, from each server's per-class figures (None: that
    server has no run at this level)."""
    sluice_admitted, sluice_all = realtime_attainment(sluice)
    bare_admitted, bare_all = realtime_attainment(bare)
    return {
        "sluice_realtime_attainment_admitted": sluice_admitted,
        "sluice_realtime_attainment_all": sluice_all,
        "bare_realtime_attainment_admitted": bare_admitted,
        "bare_realtime_attainment_all": bare_all,
        "bare_falls": bare_admitted is not None and bare_admitted < ATTAINMENT_TARGET,
        "target": ATTAINMENT_TARGET,
        "pass": sluice_admitted is not None and sluice_admitted >= ATTAINMENT_TARGET,
    }
