"""The statistics every benchmark shares: percentiles, Jain's index and weighted fair shares.

Pure functions of plain numbers, tested on synthetic values with answers worked out by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

PercentileMethod = Literal["linear", "nearest_rank"]


def percentile(
    values: Iterable[float],
    q: float,
    *,
    method: PercentileMethod = "linear",
    empty: float = 0.0,
) -> float:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``values``; ``empty`` when there are none.

    ``linear`` interpolates between the two nearest ranks. ``nearest_rank`` is the smallest
    value with at least ``q`` % of the values at or below it: always one of the values, so an
    infinite value (a request that never answered) counts as infinitely late instead of turning
    the result into NaN.
    """
    ordered = sorted(values)
    if not ordered:
        return empty
    if method == "nearest_rank":
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def jain_index(values: Sequence[float], *, undefined: float = 1.0) -> float:
    """Jain's fairness index ``(Σx)² / (n·Σx²)``: 1 when all equal, 1/n when one takes all.

    ``undefined`` for no values or all zeros (by default 1.0: nothing to be unfair about).
    """
    squares = sum(v * v for v in values)
    if not values or squares == 0:
        return undefined
    return sum(values) ** 2 / (len(values) * squares)


def weighted_fair_shares(
    demands: Mapping[str, float], weights: Mapping[str, float], capacity: float
) -> dict[str, float]:
    """Weighted max-min fair split of ``capacity`` (water-filling).

    Each tenant gets capacity in proportion to its weight, never more than its demand; what a
    satisfied tenant leaves is shared among the rest by weight again.
    """
    shares = {name: 0.0 for name in demands}
    active = {name for name, demand in demands.items() if demand > 0}
    left = capacity
    while active and left > 1e-12:
        total_weight = sum(weights[name] for name in active)
        per_weight = left / total_weight
        satisfied = {
            name for name in active if demands[name] - shares[name] <= per_weight * weights[name]
        }
        if not satisfied:
            for name in active:
                shares[name] += per_weight * weights[name]
            break
        for name in satisfied:
            left -= demands[name] - shares[name]
            shares[name] = demands[name]
        active -= satisfied
    return shares


def fairness(
    served: Mapping[str, float], demands: Mapping[str, float], weights: Mapping[str, float]
) -> float:
    """Jain's index of ``served_i / fair_i`` over tenants with a non-zero fair share."""
    fair = weighted_fair_shares(demands, weights, sum(served.values()))
    ratios = [served[name] / share for name, share in fair.items() if share > 0]
    return jain_index(ratios)
