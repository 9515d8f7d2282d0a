"""Reading the services' Prometheus ``/metrics``: a parser of the text format, sums of a metric
over label values, and :class:`IncarnationCounters`, which keeps a counter of a process that
is killed and restarted (its counter starts again from zero) as the sum over its incarnations.
"""

from __future__ import annotations

import re
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""``(metric name, sorted (label, value) pairs) → value``."""

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    """The samples of a Prometheus text exposition (comments and bad lines skipped)."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, _, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        pairs = tuple(sorted(_LABEL.findall(labels or "")))
        out[(name, pairs)] = number
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every sample whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, pairs), v in samples.items() if n == name and wanted <= set(pairs))


def scrape(address: str, timeout_s: float = 2.0, names: Sequence[str] = ()) -> Samples | None:
    """``http://<address>/metrics`` parsed; None when it cannot be read (a process down).
    ``names``: only those samples (``name[]`` query parameters: the server formats nothing
    else, a twentieth of the scheduler's full exposition, which holds its GIL for ~4 ms)."""
    query = urllib.parse.urlencode([("name[]", n) for n in names])
    url = f"http://{address}/metrics" + (f"?{query}" if query else "")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return parse(reply.read().decode())
    except OSError:
        return None


@dataclass
class IncarnationCounters:
    """Counters of processes that may be restarted: the last value read of each incarnation
    (a process by its PID), summed. What an incarnation counted after its last read is not
    known: read right before a kill to keep that small."""

    last: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)

    def observe(self, source: str, pid: int, values: Mapping[str, float]) -> None:
        """The counters ``values`` read from ``source`` (its process ``pid``) now."""
        self.last[(source, pid)] = dict(values)

    def total(self, counter: str) -> float:
        """``counter`` summed over every incarnation of every source."""
        return sum(values.get(counter, 0.0) for values in self.last.values())

    def incarnations(self, source: str) -> int:
        """How many incarnations of ``source`` were read."""
        return sum(s == source for s, _ in self.last)
