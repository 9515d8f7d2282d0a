"""Memory and CPU of a process together with every process it started (Linux ``/proc``).

A system that runs in several processes (vLLM starts its engine core and model worker as
processes of their own) cannot be measured by ``getrusage`` of the worker alone: ``RUSAGE_SELF``
misses the children, and ``RUSAGE_CHILDREN`` counts only children already waited for, and
only the largest. Here a process tree is read live instead.

Rules: a tree is ``root`` plus every process whose chain of parents reaches ``root`` at the
moment of reading; a process that cannot be read (gone, or no ``/proc``) counts as 0. RSS
sums count a page shared by several processes once per process, so a tree's RSS is an upper
bound of the memory it holds.
"""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Mapping
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` from field 3 (state) on; [] when unreadable. The command name
    (field 2) may hold spaces and parentheses, so the line is split after its last ``)``."""
    try:
        text = (PROC / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return []
    return text.rsplit(")", 1)[-1].split()


def parent_map() -> dict[int, int]:
    """Every readable process's parent id, by process id."""
    parents: dict[int, int] = {}
    try:
        entries = list(PROC.iterdir())
    except OSError:
        return parents
    for entry in entries:
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if len(fields) > 1:
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(root: int, parents: Mapping[int, int]) -> set[int]:
    """The ids of every process below ``root`` in ``parents`` (``root`` itself excluded)."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        if pid != parent:
            children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def tree_pids(root: int) -> set[int]:
    """``root`` and its live descendants."""
    return {root} | descendants(root, parent_map())


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (0 when unreadable)."""
    try:
        text = (PROC / str(pid) / "statm").read_text(encoding="ascii")
        return int(text.split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds ``pid`` has used (0 when unreadable)."""
    fields = _stat_fields(pid)
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (ValueError, IndexError, OSError):
        return 0.0


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used by ``root`` and its live descendants (exited ones are not counted)."""
    return sum(cpu_seconds(pid) for pid in tree_pids(root))


class TreeRssSampler:
    """Samples the summed RSS of ``root``'s tree every ``interval_s`` on a daemon thread
    between :meth:`start` and :meth:`stop`; keeps the largest sum and the most processes seen.
    A sample costs one scan of ``/proc`` (milliseconds)."""

    def __init__(self, root: int, interval_s: float) -> None:
        self._root = root
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-rss", daemon=True)
        self.peak_bytes = 0
        self.peak_processes = 0

    def sample(self) -> None:
        """Read the tree once and update the peaks."""
        pids = tree_pids(self._root)
        self.peak_bytes = max(self.peak_bytes, sum(rss_bytes(pid) for pid in pids))
        self.peak_processes = max(self.peak_processes, len(pids))

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval_s):
                return

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (after one last sample) and wait for the thread."""
        self._stop.set()
        self._thread.join()
        self.sample()
