"""The signals an autoscaler could scale node pools on, sampled from the scheduler's
``/metrics`` through every load run, and how well each tracks SLO risk (issue 21: which metric
the HorizontalPodAutoscaler and KEDA follow).

A :class:`Sampler` thread reads the scheduler every ``interval_s`` while a run lasts. The run is
cut into bins of ``bin_s``; in each bin:

- ``predicted_wait_s``: the mean queue wait admission predicted for the REALTIME decisions
  made in the bin (``sluice_scheduler_predicted_queue_wait_seconds``, increase of sum over
  increase of count; refused requests included), None without decisions;
- ``tokens_in_flight``: tokens the scheduler estimates in flight per node
  (``sluice_scheduler_node_tokens_in_flight``), the mean of the bin's samples;
- ``sequences``: running and waiting sequences per node (``sluice_scheduler_node_sequences``:
  what the shipped HPA follows today);
- ``queue_depth``: requests waiting in the scheduler's queues (all classes and tenants).

SLO risk of a bin: the share of the REALTIME requests sent in it that were not served within
the SLO (refused, failed, or answered past it): what scaling up would have saved. Each signal is
scored over the bins of every run by Spearman's rank correlation with that share, by the
area under the ROC curve of telling bins at risk (share above ``risk_share``) from the others,
and by the value that tells them apart best (Youden's J): a scaling target's starting point.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.jobs.metrics import Samples, scrape, total
from bench.load.records import RequestRecord

PREDICTED = "sluice_scheduler_predicted_queue_wait_seconds"
TOKENS = "sluice_scheduler_node_tokens_in_flight"
SEQUENCES = "sluice_scheduler_node_sequences"
QUEUE = "sluice_scheduler_queue_depth"
SIGNALS = ("predicted_wait_s", "tokens_in_flight", "sequences", "queue_depth")
SAMPLED = (PREDICTED + "_count", PREDICTED + "_sum", TOKENS, SEQUENCES, QUEUE)
"""The samples a :class:`Sampler` asks for: a scrape of everything, once a second, held the
scheduler's event loop for ~4 ms each time, the tail of the refusal latency it measures."""
REALTIME = "realtime"


@dataclass
class Series:
    """One run's samples: ``(unix time, samples)``, in time order."""

    points: list[tuple[float, Samples]] = field(default_factory=list)


class Sampler:
    """Samples the scheduler's ``/metrics`` through each watched run (:meth:`watch`)."""

    def __init__(self, address: Callable[[], str], interval_s: float = 1.0) -> None:
        self._address = address
        self.interval_s = interval_s
        self.series: dict[Any, Series] = {}

    @contextmanager
    def watch(self, key: Any) -> Iterator[Series]:
        """Sample on a thread until the block ends; the series is kept under ``key``."""
        series = self.series[key] = Series()
        stop = threading.Event()

        def loop() -> None:
            while True:
                samples = scrape(self._address(), names=SAMPLED)
                if samples is not None:
                    series.points.append((time.time(), samples))
                if stop.wait(self.interval_s):
                    return

        thread = threading.Thread(target=loop, name="slo-signals", daemon=True)
        thread.start()
        try:
            yield series
        finally:
            stop.set()
            thread.join(5.0)


def _nodes(samples: Samples, name: str) -> int:
    return len({pairs for n, pairs in samples if n == name})


def _per_node(samples: Samples, name: str) -> float:
    return total(samples, name) / max(1, _nodes(samples, name))


def bin_signals(
    points: Sequence[tuple[float, Samples]], start: float, end: float
) -> dict[str, float | None]:
    """Each signal over ``[start, end)`` (see the module doc); None where nothing was read."""
    inside = [s for t, s in points if start <= t < end]
    before = [s for t, s in points if t < start]
    out: dict[str, float | None] = {
        "tokens_in_flight": _mean([_per_node(s, TOKENS) for s in inside]),
        "sequences": _mean([_per_node(s, SEQUENCES) for s in inside]),
        "queue_depth": _mean([total(s, QUEUE) for s in inside]),
        "predicted_wait_s": None,
    }
    first = before[-1] if before else (inside[0] if inside else None)
    last = inside[-1] if inside else None
    if first is not None and last is not None:
        count, summed = (
            total(last, PREDICTED + part, workload_class=REALTIME)
            - total(first, PREDICTED + part, workload_class=REALTIME)
            for part in ("_count", "_sum")
        )
        if count > 0:
            out["predicted_wait_s"] = summed / count
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def bins(
    points: Sequence[tuple[float, Samples]],
    records: Sequence[RequestRecord],
    started_at: float,
    window_s: float,
    meets: Callable[[RequestRecord], bool],
    bin_s: float = 5.0,
) -> list[dict[str, Any]]:
    """The run's bins: each signal and the REALTIME requests sent in it, with the share not
    served within the SLO; bins without REALTIME requests are left out."""
    out = []
    edge = 0.0
    while edge < window_s - 1e-9:
        sent = [
            r
            for r in records
            if r.workload_class == REALTIME
            and r.sent_s is not None
            and edge <= r.sent_s < edge + bin_s
        ]
        if sent:
            bad = sum(not meets(r) for r in sent)  # meets: answered OK within the SLO
            out.append(
                {
                    "t_s": edge,
                    "realtime": len(sent),
                    "bad_share": bad / len(sent),
                    **bin_signals(points, started_at + edge, started_at + edge + bin_s),
                }
            )
        edge += bin_s
    return out


def ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None for fewer than 3 pairs or a constant side."""
    if len(xs) < 3:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return float(cov / (vx * vy) ** 0.5)


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (the Mann-Whitney statistic:
    the chance a positive outranks a negative, ties counting half); None without both kinds."""
    pos = sum(positive)
    neg = len(positive) - pos
    if pos == 0 or neg == 0:
        return None
    r = ranks(scores)
    rank_sum = sum(rk for rk, p in zip(r, positive, strict=True) if p)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def best_threshold(scores: Sequence[float], positive: Sequence[bool]) -> dict[str, Any] | None:
    """The value of ``scores`` that best tells positives from negatives as "at or above it":
    the one maximizing Youden's J (true-positive rate less false-positive rate), with both
    rates; None without both kinds."""
    pos = sum(positive)
    neg = len(positive) - pos
    if pos == 0 or neg == 0:
        return None
    best: dict[str, Any] | None = None
    for cut in sorted(set(scores)):
        tpr = sum(s >= cut and p for s, p in zip(scores, positive, strict=True)) / pos
        fpr = sum(s >= cut and not p for s, p in zip(scores, positive, strict=True)) / neg
        if best is None or tpr - fpr > best["j"]:
            best = {"value": cut, "j": tpr - fpr, "tpr": tpr, "fpr": fpr}
    return best


def score_signals(
    all_bins: Sequence[Mapping[str, Any]], risk_share: float = 0.05
) -> dict[str, dict[str, Any]]:
    """Each signal's Spearman correlation with the bins' bad share and its AUC for bins at
    risk, over the bins where it was read."""
    out = {}
    for name in SIGNALS:
        pairs = [(b[name], b["bad_share"]) for b in all_bins if b.get(name) is not None]
        xs = [float(x) for x, _ in pairs]
        ys = [float(y) for _, y in pairs]
        out[name] = {
            "bins": len(pairs),
            "at_risk": sum(y > risk_share for y in ys),
            "spearman": spearman(xs, ys),
            "auc": auc(xs, [y > risk_share for y in ys]),
            "threshold": best_threshold(xs, [y > risk_share for y in ys]),
        }
    return out
