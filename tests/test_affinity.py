"""sluice/runtime/affinity.py on real processes: a "node" whose child binds itself to one core
(as vLLM's CPU worker does) and whose other child does not."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from sluice.runtime import affinity

CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

pytestmark = pytest.mark.skipif(
    not affinity.supported() or len(CORES) < 2, reason="needs Linux and two cores"
)

NODE = """
import os, subprocess, sys, time
engine = int(sys.argv[1])
code = f"import os, time; os.sched_setaffinity(0, {{{engine}}}); print(1, flush=True)"
bound = subprocess.Popen(
    [sys.executable, "-c", code + "; time.sleep(60)"], stdout=subprocess.PIPE
)
bound.stdout.readline()
free = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(bound.pid, free.pid, flush=True)
time.sleep(60)
"""
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _stop(procs: list[subprocess.Popen[Any]], pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture
def node() -> Iterator[tuple[int, int, int]]:
    """(node pid, its bound child's pid, its unbound child's pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", NODE, str(CORES[0])], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    bound, free = (int(p) for p in proc.stdout.readline().split())
    try:
        yield proc.pid, bound, free
    finally:
        _stop([proc], [bound, free])


def _affinity(pid: int) -> set[int]:
    return set(os.sched_getaffinity(pid))


def test_process_tree_finds_grandchildren(node: tuple[int, int, int]) -> None:
    pid, bound, free = node
    tree = affinity.process_tree(pid)
    assert tree[0] == pid
    assert {bound, free} <= set(tree)


def test_node_moves_its_threads_off_the_engine_core(node: tuple[int, int, int]) -> None:
    pid, bound, free = node
    split = affinity.keep_engine_cores([pid], [pid])
    others = set(CORES[1:])
    assert split.engine == {CORES[0]}
    assert split.others == others
    assert split.moved >= 2  # the node's main thread and the unbound child's
    assert _affinity(pid) == others
    assert _affinity(free) == others
    assert _affinity(bound) == {CORES[0]}
    again = affinity.keep_engine_cores([pid], [pid])
    assert again.engine == {CORES[0]}, "the threads it moved are not taken for the engine's"
    assert again.moved == 0


def test_services_beside_the_node_are_moved_too(node: tuple[int, int, int]) -> None:
    pid, bound, _free = node
    affinity.keep_engine_cores([pid], [pid])  # what the node does for itself first
    service = subprocess.Popen(SLEEPER)
    try:
        split = affinity.keep_engine_cores([pid], [pid, service.pid])
        assert split.engine == {CORES[0]}
        assert split.moved >= 1
        assert _affinity(service.pid) == set(CORES[1:])
        assert _affinity(bound) == {CORES[0]}
    finally:
        _stop([service], [])


def test_nothing_moves_without_a_bound_thread() -> None:
    service = subprocess.Popen(SLEEPER)
    try:
        split = affinity.keep_engine_cores([service.pid], [service.pid])
        assert split.moved == 0
        assert not split.engine
        assert _affinity(service.pid) == set(CORES)
    finally:
        _stop([service], [])


def test_process_tree_reads_a_name_that_is_not_utf8() -> None:
    """The kernel writes a process's name as raw bytes (cut at 15, possibly mid-character)."""
    code = "open('/proc/self/comm', 'wb').write(b'caf\\xc3'); print(1, flush=True); "
    child = subprocess.Popen(
        [sys.executable, "-c", code + "import time; time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        assert (affinity.PROC / str(child.pid) / "comm").read_bytes() == b"caf\xc3\n"
        assert child.pid in affinity.process_tree(os.getpid())
    finally:
        _stop([child], [])
