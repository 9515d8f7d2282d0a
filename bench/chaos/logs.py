"""What the schedulers said about the fault: selected events of their JSON logs, put on the
scenario's clock, for the timeline (they explain the figures: a node ejected as an outlier, a
stall detected, the quota backend lost).

Events about the fleet are listed one by one; frequent ones are summed up (how many, first
and last time).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

ONE_BY_ONE = frozenset(
    {"node_added", "node_removed", "node_health", "node_ejected", "node_stalled", "service_ready"}
)
SUMMED = frozenset(
    {
        "request_retried",
        "cache_lookup_failed",
        "cache_store_failed",
        "quota_backend_unavailable",
        "quota_release_failed",
        "retry_budget_spent",
        "dispatch_tick_failed",
    }
)


def _when(line: dict[str, Any], origin_unix: float) -> float | None:
    stamp = line.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - origin_unix
    except ValueError:
        return None


def _describe(event: str, line: dict[str, Any]) -> str:
    keys = ("node_id", "healthy", "signal", "value_s", "eject_s", "reason")
    extra = ", ".join(f"{k}={line[k]}" for k in keys if k in line)
    return f"{event} ({extra})" if extra else event


def scheduler_events(
    lines: Iterable[str],
    origin_unix: float,
    source: str,
    since_s: float = 0.0,
    until_s: float = float("inf"),
) -> list[tuple[float, str]]:
    """Timeline entries from one scheduler's log lines (``source`` names the scheduler);
    events outside ``[since_s, until_s]`` (start-up, shutdown) are left out."""
    entries: list[tuple[float, str]] = []
    summed: dict[str, list[float]] = {}
    for raw in lines:
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(line, dict):
            continue
        event = line.get("event")
        when = _when(line, origin_unix)
        if when is None or not since_s <= when <= until_s or not isinstance(event, str):
            continue
        if event in ONE_BY_ONE:
            entries.append((round(when, 2), f"{source}: {_describe(event, line)}"))
        elif event in SUMMED:
            summed.setdefault(event, []).append(when)
    entries = _collapse(entries)
    for event, times in summed.items():
        text = f"{source}: {event} ×{len(times)} (last at {max(times):.2f} s)"
        entries.append((round(min(times), 2), text))
    return sorted(entries)


def _collapse(entries: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """The same text within 0.5 s of its first: one entry, ``×N``."""
    out: list[tuple[float, str, int]] = []
    for when, text in entries:
        if out and out[-1][1] == text and when - out[-1][0] <= 0.5:
            out[-1] = (out[-1][0], text, out[-1][2] + 1)
        else:
            out.append((when, text, 1))
    return [(when, f"{text} ×{n}" if n > 1 else text) for when, text, n in out]


def read_events(
    paths: Iterable[tuple[str, Path]],
    origin_unix: float,
    since_s: float = 0.0,
    until_s: float = float("inf"),
) -> list[tuple[float, str]]:
    """:func:`scheduler_events` of every ``(name, log path)`` that exists."""
    entries: list[tuple[float, str]] = []
    for name, path in paths:
        if path.exists():
            with path.open(errors="replace") as log:
                entries += scheduler_events(log, origin_unix, name, since_s, until_s)
    return sorted(entries)
