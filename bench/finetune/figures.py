"""The fine-tune benchmark's figures, computed from what a run recorded (pure functions, tested
on synthetic values).

Definitions:

- *load*: REALTIME open-loop Poisson arrivals (seeded: the same arrivals every time at one
  rate) whose offered tokens per second are that share of the node's *capacity*, the node's
  generated tokens per second under a closed loop of more BATCH streams than it has slots
  (``sluice_node_generated_tokens_total``, increase over the window), measured in the same run.
- *TTFT p99*, *inter-token p99*: of the REALTIME requests of a phase, as
  :mod:`bench.jobs.figures` defines them (a request without a token counts with the time it
  waited; each chunk's gap spread over its tokens). *With training* and *without* are the same
  arrivals on the same node, with and without a fine-tune job training there. Target: with
  ≤ 1.2 × without, for both.
- *training progress*: the training node's ``sluice_node_training_tokens_total`` (tokens of
  finished optimizer steps, prompts included), increase over a phase's arrival window divided
  by its length. *Alone*: the same job over a window with no inference at all. Target: at
  30 % load ≥ 50 % of alone; 10 % and 60 % are reported.
- *yield wait*: what the node records in ``sluice_node_training_yield_wait_seconds``: a
  request that arrived during a training unit waited until it ended (``wait=admission``); a
  unit run beside running sequences held back their next token (``wait=decode``). The p99 is
  read off the histogram's increase over the phases with training, as Prometheus's
  ``histogram_quantile`` reads it (linear within a bucket); the verdict takes the bucket's
  upper edge (the most the p99 can be), so it never passes on interpolation. Target: ≤ the
  node's configured yield bound (``--training-yield-bound-ms``).
- *losses after a kill*: the per-step losses of a job whose training node was SIGKILLed
  mid-job and which resumed on another node, against an uninterrupted job of the same spec,
  data and seed; every step of both must be there. Target: every step within 1e-4.
- *exact match*: see :mod:`bench.finetune.task`; greedy decoding through the public
  ``Generate``, the adapter as ``"<base>:<adapter>"``. Targets: adapter ≥ 90 %, base ≤ 10 %
  ("near 0 %").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from bench.jobs.figures import ratio
from bench.jobs.metrics import Samples

TTFT_RATIO_TARGET = 1.2
INTER_TOKEN_RATIO_TARGET = 1.2
PROGRESS_SHARE_TARGET = 0.5
LOSS_TOLERANCE = 1e-4
ADAPTER_MATCH_TARGET = 0.9
BASE_MATCH_TARGET = 0.1
YIELD_WAIT = "sluice_node_training_yield_wait_seconds"
WAIT_KINDS = ("admission", "decode")

Buckets = dict[float, float]
"""A histogram's cumulative counts by upper edge (``le``; ``inf`` last)."""


def buckets(samples: Samples | None, name: str, **labels: str) -> Buckets:
    """The cumulative bucket counts of histogram ``name``, summed over every label set that
    includes ``labels`` (empty when ``samples`` is None)."""
    wanted = set(labels.items())
    out: Buckets = {}
    for (metric, pairs), value in (samples or {}).items():
        if metric != f"{name}_bucket" or not wanted <= set(pairs):
            continue
        edge = float(dict(pairs)["le"])
        out[edge] = out.get(edge, 0.0) + value
    return dict(sorted(out.items()))


def increase(before: Buckets, after: Buckets) -> Buckets:
    """Counts added between two reads of one histogram (a bucket missing before counts 0)."""
    return {edge: max(0.0, n - before.get(edge, 0.0)) for edge, n in after.items()}


def histogram_quantile(counts: Buckets, q: float) -> float | None:
    """The ``q``-quantile (0-1) as Prometheus reads it: linear within the bucket that holds
    it, the lowest bucket starting at 0; the highest finite edge when it falls in ``+Inf``.
    None without observations."""
    if not counts:
        return None
    total = counts.get(math.inf, max(counts.values()))
    if total <= 0:
        return None
    rank = q * total
    low_edge, low_count = 0.0, 0.0
    for edge, count in counts.items():
        if count >= rank:
            if math.isinf(edge):
                return low_edge
            if count == low_count:
                return edge
            return low_edge + (edge - low_edge) * (rank - low_count) / (count - low_count)
        low_edge, low_count = edge, count
    return low_edge


def quantile_edge(counts: Buckets, q: float) -> float | None:
    """The upper edge of the bucket holding the ``q``-quantile: the most it can be (``inf``
    when it lies beyond the last finite edge). None without observations."""
    total = counts.get(math.inf, max(counts.values(), default=0.0))
    if total <= 0:
        return None
    return next(edge for edge, count in counts.items() if count >= q * total)


def wait_figures(counts: Buckets, bound_s: float) -> dict[str, Any]:
    """Count, p50 and p99 of one histogram's increase, and whether its p99 is within the
    bound (judged on the p99's bucket edge; no observation passes: nothing waited)."""
    edge = quantile_edge(counts, 0.99)
    observed = counts.get(math.inf, max(counts.values(), default=0.0))
    return {
        "count": int(observed),
        "p50_s": histogram_quantile(counts, 0.5),
        "p99_s": histogram_quantile(counts, 0.99),
        "p99_edge_s": edge,
        "pass": edge is None or edge <= bound_s + 1e-12,
    }


def yield_waits(
    before: Samples | None, after: Samples | None, bound_s: float
) -> dict[str, dict[str, Any]]:
    """Yield-wait figures between two scrapes of the training node, per kind and together."""
    out = {}
    for kind in (*WAIT_KINDS, "all"):
        labels = {} if kind == "all" else {"wait": kind}
        counts = increase(
            buckets(before, YIELD_WAIT, **labels), buckets(after, YIELD_WAIT, **labels)
        )
        out[kind] = wait_figures(counts, bound_s)
    return out


def sharing_verdict(
    without: Mapping[str, Any], with_training: Mapping[str, Any], alone_tokens_per_s: float | None
) -> dict[str, Any]:
    """The targets of figures 1 and 2 at the compared load: latency ratios and the share of
    the job's alone progress it kept."""
    ttft = ratio(with_training.get("ttft_p99_s"), without.get("ttft_p99_s"))
    itl = ratio(with_training.get("inter_token_p99_s"), without.get("inter_token_p99_s"))
    share = ratio(with_training.get("training_tokens_per_s"), alone_tokens_per_s)
    return {
        "ttft_ratio": ttft,
        "ttft_pass": ttft is not None and ttft <= TTFT_RATIO_TARGET,
        "inter_token_ratio": itl,
        "inter_token_pass": itl is not None and itl <= INTER_TOKEN_RATIO_TARGET,
        "progress_share": share,
        "progress_pass": share is not None and share >= PROGRESS_SHARE_TARGET,
    }


def progress_curve(
    phases: Sequence[Mapping[str, Any]], alone_tokens_per_s: float | None
) -> list[dict[str, Any]]:
    """``(load, training tokens/s, share of alone)`` per phase with training, by load."""
    points = [
        {
            "load": p["load"],
            "training_tokens_per_s": p.get("training_tokens_per_s"),
            "share_of_alone": ratio(p.get("training_tokens_per_s"), alone_tokens_per_s),
        }
        for p in phases
    ]
    return sorted(points, key=lambda p: float(p["load"]))


def compare_losses(
    reference: Mapping[int, float], resumed: Mapping[int, float], tolerance: float = LOSS_TOLERANCE
) -> dict[str, Any]:
    """Per-step losses of the resumed job against the uninterrupted one: steps missing from
    either, the largest difference over the steps both have, and whether every step is there
    and within ``tolerance``."""
    common = sorted(set(reference) & set(resumed))
    diffs = [abs(reference[s] - resumed[s]) for s in common]
    worst = max(range(len(diffs)), key=diffs.__getitem__, default=None)
    missing_resumed = sorted(set(reference) - set(resumed))
    missing_reference = sorted(set(resumed) - set(reference))
    return {
        "steps_compared": len(common),
        "missing_in_resumed": missing_resumed,
        "missing_in_reference": missing_reference,
        "max_abs_diff": max(diffs) if diffs else None,
        "worst_step": common[worst] if worst is not None else None,
        "within_tolerance": sum(d <= tolerance for d in diffs),
        "tolerance": tolerance,
        "pass": bool(common)
        and not missing_resumed
        and not missing_reference
        and all(d <= tolerance for d in diffs),
    }


def quality_verdict(adapter_rate: float | None, base_rate: float | None) -> dict[str, Any]:
    """The two targets of figure 5."""
    return {
        "adapter_pass": adapter_rate is not None and adapter_rate >= ADAPTER_MATCH_TARGET,
        "base_pass": base_rate is not None and base_rate <= BASE_MATCH_TARGET,
    }


def realtime_rps(capacity_tokens_per_s: float, load: float, tokens_per_request: int) -> float:
    """Requests per second whose output tokens are ``load`` of the capacity."""
    if capacity_tokens_per_s <= 0 or tokens_per_request <= 0:
        raise ValueError("capacity and tokens per request must be positive")
    return load * capacity_tokens_per_s / tokens_per_request
