"""Worker threads that run torch ops on fewer intra-op threads than the process's default.

torch's intra-op thread count (OpenMP on CPU) is a thread's own once that thread has run its
first parallel op; ``torch.set_num_threads`` sets the calling thread's count and also the count
every thread that has not yet run one will take (a thread takes it on its first parallel op
or ``torch.get_num_threads`` call). :func:`pinned_pool` starts its workers, has each one set
and take its count, waits until all have, then sets the process's count back for every other
thread (the engine's, training's).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

PIN_TIMEOUT_S = 60.0
"""Longest :func:`pinned_pool` waits for its workers to start."""


def pinned_pool(workers: int, threads: int | None, prefix: str) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, started now, each running torch ops on ``threads``
    intra-op threads (``None``: the process's count, as any thread); other threads keep the
    process's count. Blocks until the workers have started."""
    if threads is None:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix)
    default = torch.get_num_threads()
    started = threading.Barrier(workers + 1, timeout=PIN_TIMEOUT_S)

    def pin() -> None:
        torch.set_num_threads(threads)
        torch.get_num_threads()  # takes the count as this thread's own, as a parallel op does
        started.wait()

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix, initializer=pin)
    try:
        for _ in range(workers):  # each blocks in pin until all have: one new thread apiece
            pool.submit(int)
        started.wait()
    except BaseException:
        started.abort()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        torch.set_num_threads(default)
    return pool


def default_workers(device: str, beside_generator: bool) -> int:
    """Embedding forwards worth running at once on ``device``: two on CPU where torch has two
    threads or more and no generator shares the node (small forwards leave a second core
    idle), else one: a generator's engine steps would share the cores with both forwards, and
    its streams' inter-token time is what the scheduler guards; one stream runs them one
    after another on CUDA anyway (docs/decisions/node-embed-workers.md)."""
    if device != "cpu" or beside_generator:
        return 1
    return 2 if torch.get_num_threads() >= 2 else 1


def threads_each(workers: int) -> int | None:
    """Each of ``workers`` workers' equal share of torch's threads (at least one); ``None``
    for a single worker (it keeps the process's count)."""
    return None if workers == 1 else max(1, torch.get_num_threads() // workers)
