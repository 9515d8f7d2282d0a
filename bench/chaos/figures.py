"""A scenario's figures, computed from its records only (pure functions, tested on synthetic
records).

Definitions (times on the scenario's clock, seconds since the load started):

- *sent*: requests the steady load started; *completed*: streams that ended normally;
  *refused*: calls refused with ``RetryInfo`` (any status code); *unavailable_after_first_token*:
  streams broken ``UNAVAILABLE`` after at least one chunk.
- *hung*: requests that went more than the stall bound (5 s) without a chunk while open —
  from their start, between two chunks, or from their last chunk to their end (or to the
  load's stop when they never ended). A stream frozen for 10 s that then finishes is hung.
- *lost*: requests not ended when the load stopped plus its grace (cancelled by the harness).
- *internal*: answers with ``INTERNAL`` (load and probes; the fuzzer's are added by the runner).
- *victim_disturbed*: the victim tenant's requests that did not complete, or were hung.
- *disturbed_on_other_nodes* (node faults only): requests that got chunks only from nodes other
  than the faulted one, were open during the fault window, and did not complete or were hung.
- *no_token_at_fault* / *completed_elsewhere* (node faults only, a client-side
  approximation of "retried elsewhere"): requests that had no chunk yet when the fault began
  and started before it was over; of those, the ones that completed with every chunk from
  another node. The client cannot see where the scheduler first sent a request, so requests
  placed on a healthy node in the first place are counted too: an upper bound of the
  requests moved. *retried_elsewhere* itself is the scheduler's own count
  (``sluice_scheduler_retries_total``), read by the runner.
- The *fault window* is ``[injected, over]``: ``over`` is the heal (SIGCONT, proxy back to
  pass-through, store back), or ``injected`` + the stall bound when nothing undoes the fault.
- Strangers (:mod:`bench.chaos.strangers`): *attempts* at internal surfaces without a valid
  client certificate or with one of the wrong identity; *succeeded*: those the service did
  (must be 0); *refused*: by code; *unexplained*: ended with a code that is not one of
  :data:`REFUSALS` (a time-out, an application error: the door's answer is not known, so the
  figure cannot count it as refused); *controls*: the right identities' calls, which must
  succeed for the figure to mean anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.chaos.load import COMPLETED, LOST, REFUSED, STALL_BOUND_S, ProbeRound, Record

RECOVERY_STREAK = 3
"""Probe rounds in a row that must meet a condition (see :func:`recovery`)."""
SUCCEEDED = "OK"
"""A stranger's attempt the service did."""
REFUSALS = frozenset(
    {
        "UNAVAILABLE",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "NOAUTH",
        "WRONGPASS",
        "NOPERM",
        "HANDSHAKE_FAILED",
    }
)
"""How an internal surface refuses a stranger: the TLS handshake fails (gRPC UNAVAILABLE; on
etcd's HTTP peer port HANDSHAKE_FAILED), the
identity may not call (PERMISSION_DENIED, UNAUTHENTICATED), Redis wants a user (NOAUTH,
WRONGPASS) or keeps one to its keys and commands (NOPERM)."""


@dataclass(frozen=True)
class FaultWindow:
    """When the fault acted and what it hit."""

    injected_s: float
    over_s: float
    """The fault is over (healed), or ``injected_s`` + the stall bound when nothing heals it."""
    reference_s: float
    """Recovery is measured from here: the heal, or the injection when nothing is undone."""
    node: str | None = None
    """The faulted node, for node faults."""


def _disturbed(record: Record, now: float, bound_s: float) -> bool:
    return record.outcome != COMPLETED or record.hung(now, bound_s)


def _overlaps(record: Record, start: float, end: float, now: float) -> bool:
    ended = record.end if record.end is not None else now
    return record.start <= end and ended >= start


def node_figures(
    records: Sequence[Record], fault: FaultWindow, now: float, bound_s: float = STALL_BOUND_S
) -> dict[str, int]:
    """The node-fault figures (see the module docstring); empty for faults of no node."""
    node = fault.node
    if node is None:
        return {}
    elsewhere = [r for r in records if r.nodes and node not in r.nodes]
    disturbed = [
        r
        for r in elsewhere
        if _overlaps(r, fault.injected_s, fault.over_s, now) and _disturbed(r, now, bound_s)
    ]
    waiting = [
        r
        for r in records
        if r.start <= fault.over_s
        and (r.end is None or r.end >= fault.injected_s)
        and (r.first is None or r.first >= fault.injected_s)
    ]
    moved = [r for r in waiting if r.outcome == COMPLETED and r.nodes and node not in r.nodes]
    return {
        "disturbed_on_other_nodes": len(disturbed),
        "no_token_at_fault": len(waiting),
        "completed_elsewhere": len(moved),
    }


def load_figures(
    records: Sequence[Record],
    *,
    victim: str,
    now: float,
    bound_s: float = STALL_BOUND_S,
) -> dict[str, Any]:
    """Counts over the steady load's records (see the module docstring)."""
    outcomes = Counter(r.outcome for r in records)
    reasons = Counter(
        " ".join(x for x in (r.code or r.outcome, r.reason) if x)
        for r in records
        if r.outcome != COMPLETED
    )
    return {
        "sent": len(records),
        "completed": outcomes[COMPLETED],
        "refused_with_retry_info": outcomes[REFUSED],
        "unavailable_after_first_token": sum(r.unavailable_after_first_token for r in records),
        "hung": sum(r.hung(now, bound_s) for r in records),
        "lost": outcomes[LOST],
        "internal": sum(r.code == "INTERNAL" for r in records),
        "victim_sent": sum(r.tenant == victim for r in records),
        "victim_disturbed": sum(
            r.tenant == victim and _disturbed(r, now, bound_s) for r in records
        ),
        "tokens": sum(r.tokens for r in records),
        "outcomes": dict(sorted(outcomes.items())),
        "failed_by_reason": dict(sorted(reasons.items())),
    }


def _recovered_at(
    rounds: Sequence[ProbeRound], good: Callable[[ProbeRound], bool], streak: int
) -> float | None:
    """The start of the first round after the last bad one, when at least ``streak`` rounds
    follow it, all good; None otherwise."""
    bad = [i for i, r in enumerate(rounds) if not good(r)]
    first_good = bad[-1] + 1 if bad else 0
    if len(rounds) - first_good < streak:
        return None
    return rounds[first_good].start


def recovery(
    rounds: Sequence[ProbeRound],
    reference_s: float,
    expected_nodes: Sequence[str],
    streak: int = RECOVERY_STREAK,
) -> dict[str, float | None]:
    """Time to recover full service for good, in seconds after ``reference_s`` (the heal, or
    the injection when nothing undoes the fault). Only probe rounds begun at or after the
    reference count. Each figure is the start of the first round after the last round that
    failed its condition, provided at least ``streak`` rounds follow (all meeting it): service
    came back and stayed until the load stopped; 0 when no round failed; None when it was not
    back, or not for ``streak`` rounds, before the load stopped. Resolution: the probe
    interval (0.5 s).

    - ``tenants_s``: every tenant's probe (a short generation, ``retry=None``) completed;
    - ``nodes_s``: the scheduler lists every node the suite had before the fault as healthy
      with a closed circuit (a killed node that never comes back leaves this None; an outlier
      ejection, a routing preference, does not count against it);
    - ``full_s``: both at once.
    """
    after = [r for r in rounds if r.start >= reference_s]
    expected = frozenset(expected_nodes)

    def fleet_ok(r: ProbeRound) -> bool:
        return r.fleet is not None and expected <= r.fleet

    def since(at: float | None) -> float | None:
        return None if at is None else round(max(0.0, at - reference_s), 2)

    return {
        "tenants_s": since(_recovered_at(after, lambda r: r.ok, streak)),
        "nodes_s": since(_recovered_at(after, fleet_ok, streak)),
        "full_s": since(_recovered_at(after, lambda r: r.ok and fleet_ok(r), streak)),
    }


def probe_figures(rounds: Sequence[ProbeRound]) -> dict[str, Any]:
    """How the probes fared."""
    probes = [r for round_ in rounds for r in round_.records]
    return {
        "probe_rounds": len(rounds),
        "probes_failed": sum(r.outcome != COMPLETED for r in probes),
        "probe_internal": sum(r.code == "INTERNAL" for r in probes),
    }


@dataclass(frozen=True)
class StrangerOutcome:
    """How one stranger's attempt ended."""

    surface: str
    """What was called, where: ``node-1 Node/Drain``, ``etcd Put /sluice/config/tenants``."""
    credential: str
    """Who called: ``plaintext``, ``foreign CA: scheduler``, ``suite: client``..."""
    code: str
    """:data:`SUCCEEDED`, a gRPC status name, Redis's error word, ``TIMEOUT``..."""


def stranger_figures(
    outcomes: Sequence[StrangerOutcome], controls: Sequence[StrangerOutcome], not_made: int = 0
) -> dict[str, Any]:
    """Per surface and in all: attempts, succeeded, refusals by code (see the module
    docstring); the controls as ``surface by credential: code``."""
    surfaces: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        entry = surfaces.setdefault(
            o.surface, {"attempts": 0, "succeeded": 0, "refused": Counter(), "credentials": set()}
        )
        entry["attempts"] += 1
        entry["credentials"].add(o.credential)
        if o.code == SUCCEEDED:
            entry["succeeded"] += 1
        else:
            entry["refused"][o.code] += 1
    succeeded = [o for o in outcomes if o.code == SUCCEEDED]
    unexplained = [o for o in outcomes if o.code != SUCCEEDED and o.code not in REFUSALS]
    return {
        "attempts": len(outcomes),
        "succeeded": len(succeeded),
        "unexplained": len(unexplained),
        "not_made": not_made,
        "refused": dict(Counter(o.code for o in outcomes if o.code != SUCCEEDED).most_common()),
        "by_surface": {
            name: {
                "attempts": e["attempts"],
                "succeeded": e["succeeded"],
                "refused": dict(e["refused"].most_common()),
                "credentials": len(e["credentials"]),
            }
            for name, e in sorted(surfaces.items())
        },
        "succeeded_calls": [f"{o.surface} by {o.credential}" for o in succeeded[:20]],
        "unexplained_calls": [f"{o.surface} by {o.credential}: {o.code}" for o in unexplained[:20]],
        "controls": {f"{o.surface} by {o.credential}": o.code for o in controls},
        "controls_ok": bool(controls) and all(o.code == SUCCEEDED for o in controls),
    }
