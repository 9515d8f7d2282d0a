"""Keep the cores an engine bound its compute threads to for those threads alone (Linux).

vLLM's CPU worker binds its OpenMP threads to cores of its own (``VLLM_CPU_OMP_THREADS_BIND``,
``auto``: all but the last core of the NUMA node) and leaves the rest to "other processes". Its
engine-core process (which spins on ``sched_yield`` while a step runs), the node's gRPC
threads and whatever else shares the machine are not bound: the kernel's load balancer moves
them onto the worker's core as soon as the other cores are busy, and the worker's step waits.
:func:`keep_engine_cores` finds the cores the process tree's bound threads hold and moves every
other thread of the tree off them (docs/decisions/node-engine-cores.md). Where vLLM binds one
logical CPU per physical core (x86 with SMT), the siblings of its cores count as others: what
moves there still shares those physical cores. The node does it for
its own process tree once its engine is up; ``sluice up`` does it for the services it runs
beside the nodes once they all serve (and again after a restart). Threads made later inherit
their creator's affinity, so a pass holds until a process restarts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_PASSES = 3
"""Scans at most: a thread started while one moved the others is moved by the next."""


@dataclass(frozen=True)
class CoreSplit:
    """What :func:`keep_engine_cores` did: the engine's cores, the others', threads moved."""

    engine: frozenset[int]
    others: frozenset[int]
    moved: int


def supported() -> bool:
    """Whether this platform has per-thread affinity under ``/proc`` (Linux)."""
    return hasattr(os, "sched_setaffinity") and (PROC / "self" / "task").is_dir()


def children() -> dict[int, list[int]]:
    """Every process's children, from each process's parent in ``/proc/<pid>/stat`` (one scan
    of ``/proc``)."""
    found: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:  # the name is raw bytes and may hold spaces and ")": read what follows the last
            parent = int((entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
        found.setdefault(parent, []).append(int(entry.name))
    return found


def process_tree(root: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    """``root`` and every process descended from it, ``root`` first (``kids``: a
    :func:`children` scan to reuse; default a fresh one)."""
    kids = children() if kids is None else kids
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(kids.get(pid, ()))
    return tree


def _tree_threads(
    roots: list[int], kids: dict[int, list[int]] | None = None
) -> dict[int, frozenset[int]]:
    """:func:`threads` of every process under ``roots`` (``kids``: a :func:`children` scan
    to reuse; default a fresh one)."""
    kids = children() if kids is None else kids
    return threads(pid for root in roots for pid in process_tree(root, kids))


def threads(pids: Iterable[int]) -> dict[int, frozenset[int]]:
    """Every thread of ``pids`` with its CPU affinity (threads that end meanwhile left out)."""
    out: dict[int, frozenset[int]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in (PROC / str(pid) / "task").iterdir():
                with contextlib.suppress(OSError):  # ProcessLookupError is one
                    out[int(task.name)] = frozenset(os.sched_getaffinity(int(task.name)))
    return out


def engine_cores(
    roots: Iterable[int], cores: frozenset[int], kids: dict[int, list[int]] | None = None
) -> frozenset[int]:
    """The cores the engines under ``roots`` (inference nodes) bound their compute threads to:
    the union of the strict subsets of ``cores`` that threads of each root's descendants are
    bound to. A root's own threads never count, nor do descendants' threads sharing its main
    thread's affinity (an earlier :func:`keep_engine_cores` moved them there). ``kids``: a
    :func:`children` scan to reuse (default a fresh one)."""
    engine: frozenset[int] = frozenset()
    kids = children() if kids is None else kids
    for root in roots:
        own = threads([root]).get(root, cores)
        for affinity in threads(process_tree(root, kids)[1:]).values():
            if affinity < cores and affinity != own:
                engine |= affinity
    return engine


def keep_engine_cores(engine_roots: Iterable[int], movable_roots: Iterable[int]) -> CoreSplit:
    """Move every thread of ``movable_roots``' process trees off the cores the engines under
    ``engine_roots`` hold (:func:`engine_cores`), onto the others this process may use. Threads
    bound within the engine's cores stay, as do those already off them. Nothing moves when no
    engine thread is bound or the engines hold every core; ``moved`` is then 0."""
    movable_roots, kids = list(movable_roots), children()
    movable = _tree_threads(movable_roots, kids)
    cores = frozenset(os.sched_getaffinity(0)).union(*movable.values())
    engine = engine_cores(engine_roots, cores, kids)
    others = cores - engine
    moved = 0
    if not engine or not others:
        return CoreSplit(engine, others, moved)
    for _ in range(_PASSES):  # threads and processes started during a pass: the next one
        fresh = 0
        for tid, affinity in movable.items():
            if affinity <= engine or affinity <= others:
                continue
            with contextlib.suppress(OSError):  # ended meanwhile, or not ours to move
                os.sched_setaffinity(tid, others)
                fresh += 1
        moved += fresh
        if not fresh:
            break
        movable = _tree_threads(movable_roots)
    return CoreSplit(engine, others, moved)
