"""What the schedulers logged, put on an experiment's clock: the fleet's events as the chaos
suite reads them (:func:`bench.chaos.logs.read_events`: node ejected, stalled, health...) and
the jobs' own (a line reclaimed, a line's task crashed, the worker's Redis errors), which
explain the figures. Pure functions of log lines, plus readers of the log files.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.chaos.logs import read_events

JOB_EVENTS = frozenset(
    {"job_line_reclaimed", "job_line_crashed", "job_worker_redis_error", "job_worker_error"}
)


@dataclass(frozen=True)
class Event:
    """One logged event: seconds on the experiment's clock, its name, the replica's log, and
    the last line of its exception or error (what went wrong, in short)."""

    t_s: float
    event: str
    source: str
    error: str = ""


def _error(line: dict[str, object]) -> str:
    text = line.get("exception") or line.get("error") or ""
    last = str(text).strip().splitlines()[-1:] or [""]
    return last[0][:160]


def job_events(lines: Iterable[str], origin_unix: float, source: str) -> list[Event]:
    """The jobs' events among one scheduler's JSON log lines (others and bad lines skipped)."""
    out = []
    for raw in lines:
        if '"job_' not in raw:
            continue
        try:
            line = json.loads(raw)
            event = line["event"]
            stamp = datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError):
            continue
        if event in JOB_EVENTS:
            out.append(
                Event(round(stamp.timestamp() - origin_unix, 2), event, source, _error(line))
            )
    return out


def count_between(events: Iterable[Event], name: str, start_s: float, end_s: float) -> int:
    """Events called ``name`` at ``start_s`` or later, before ``end_s``."""
    return sum(e.event == name and start_s <= e.t_s < end_s for e in events)


def errors(events: Iterable[Event], name: str) -> dict[str, int]:
    """How often each error ended events called ``name``, most frequent first."""
    return dict(Counter(e.error for e in events if e.event == name).most_common())


def runs(events: Iterable[Event], gap_s: float = 1.0) -> list[tuple[float, str]]:
    """Timeline entries: consecutive events of one kind from one replica, each within
    ``gap_s`` of the one before, as one entry ``source: event ×N``."""
    ordered = sorted(events, key=lambda e: (e.source, e.event, e.t_s))
    out: list[tuple[float, str]] = []
    first: Event | None = None
    last: Event | None = None
    count = 0
    for e in [*ordered, None]:
        same = (
            e is not None
            and last is not None
            and (e.source, e.event) == (last.source, last.event)
            and e.t_s - last.t_s <= gap_s
        )
        if same:
            count += 1
            last = e
            continue
        if first is not None and last is not None:
            until = f" until {last.t_s:g} s" if count > 1 else ""
            out.append((first.t_s, f"{first.source}: {first.event} ×{count}{until}"))
        first, last, count = e, e, 1
    return sorted(out)


def read(logs: Path, names: Iterable[str], origin_unix: float) -> list[Event]:
    """The jobs' events of the named schedulers' logs in ``logs`` (every incarnation)."""
    out: list[Event] = []
    for name in names:
        path = logs / f"{name}.log"
        if path.exists():
            with path.open(errors="replace") as log:
                out += job_events(log, origin_unix, name)
    return sorted(out, key=lambda e: e.t_s)


def timeline(
    own: list[tuple[float, str]], logs: Path, names: list[str], origin_unix: float
) -> list[dict[str, object]]:
    """The experiment's own entries merged with the schedulers' fleet and job events."""
    fleet = read_events([(n, logs / f"{n}.log") for n in names], origin_unix, 0.0)
    jobs = runs(read(logs, names, origin_unix))
    return [{"t_s": t, "event": e} for t, e in sorted([*own, *fleet, *jobs], key=lambda x: x[0])]
