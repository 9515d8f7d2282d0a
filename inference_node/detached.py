"""Generations that outlive their caller (``NodeGenerateRequest.detached``).

A job line's scheduler replica may be killed while the node generates for it; another replica
takes the line over and calls again with the same ``request_id``. Rather than generating it a
second time, the node keeps a detached generation going when its call ends, records its chunks,
and hands the whole generation (from its first chunk, then live) to the next call that names
it. A finished generation is kept ``retain_s`` seconds, then dropped; at most ``max_kept`` are
kept (the oldest finished go first; running ones are never dropped, the engine bounds them).
Only a caller with the same tenant, adapter and model may attach; a generation that failed or
was cut off is dropped at once, so a retry of the line generates it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import structlog

from sluice.v1 import common_pb2, inference_pb2

log = structlog.get_logger(__name__)


COMPLETE = frozenset(
    {
        common_pb2.FINISH_REASON_EOS,
        common_pb2.FINISH_REASON_LENGTH,
        common_pb2.FINISH_REASON_STOP,
    }
)
"""Finish reasons of a generation that ran to its end (not cut off)."""


class Detached:
    """One detached generation: whose it is, its chunks so far and how it ended."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        """Tenant, adapter and model of the request: only the same may attach."""
        self.chunks: list[inference_pb2.GenerateChunk] = []
        self.error: BaseException | None = None
        self.done = False
        self.finished_at = 0.0
        self.followers = 0
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _append(self, chunk: inference_pb2.GenerateChunk) -> None:
        self.chunks.append(chunk)
        self._changed.set()

    @property
    def usable(self) -> bool:
        """Running, or finished whole: a generation that failed or was cut off is not handed
        on (the caller generates the line again)."""
        if not self.done:
            return True
        return (
            self.error is None and bool(self.chunks) and self.chunks[-1].finish_reason in COMPLETE
        )

    def _end(self, error: BaseException | None) -> None:
        self.error = error
        self.done = True
        self.finished_at = time.monotonic()
        self._changed.set()

    async def follow(self) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """Every chunk from the first, then the new ones as they come; raises how the
        generation failed, if it did."""
        sent = 0
        self.followers += 1
        try:
            while True:
                while sent < len(self.chunks):
                    yield self.chunks[sent]
                    sent += 1
                if self.done:
                    if self.error is not None:
                        raise self.error
                    return
                self._changed.clear()
                if sent == len(self.chunks) and not self.done:
                    await self._changed.wait()
        finally:
            self.followers -= 1


class DetachedGenerations:
    """The node's detached generations by job key (see the module docstring)."""

    def __init__(self, retain_s: float = 120.0, max_kept: int = 1024) -> None:
        self._retain_s = retain_s
        self._max_kept = max_kept
        self._by_key: OrderedDict[str, Detached] = OrderedDict()

    def get(self, key: str, owner: str) -> Detached | None:
        """The detached generation ``key`` names for ``owner`` (tenant, adapter and model of
        the request), if the node still has it running or finished whole; another owner's is
        never revealed."""
        self._expire()
        detached = self._by_key.get(key)
        if detached is None or detached.owner != owner or not detached.usable:
            return None
        return detached

    def start(
        self, key: str, owner: str, source: AsyncIterator[inference_pb2.GenerateChunk]
    ) -> Detached:
        """Pump ``source`` (a generation already admitted by the engine) into a new detached
        generation under ``key``; it runs to its end whoever follows it."""
        self._expire()
        detached = Detached(owner)
        self._by_key[key] = detached
        pump = self._pump(key, detached, source)
        detached.task = asyncio.create_task(pump, name=f"detached {key}")
        self._trim()
        return detached

    def running(self) -> int:
        """Detached generations not finished."""
        return sum(1 for d in self._by_key.values() if not d.done)

    async def close(self) -> None:
        """Stop every running generation (the node is stopping)."""
        tasks = [d.task for d in self._by_key.values() if d.task is not None and not d.done]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._by_key.clear()

    async def _pump(
        self, key: str, detached: Detached, source: AsyncIterator[inference_pb2.GenerateChunk]
    ) -> None:
        error: BaseException | None = None
        try:
            async for chunk in source:
                detached._append(chunk)
        except asyncio.CancelledError as exc:
            error = exc
            raise
        except Exception as exc:  # the caller gets the generation's own status
            error = exc
        finally:
            detached._end(error)  # first: followers never wait on a pump that is gone
            if not detached.usable and self._by_key.get(key) is detached:
                del self._by_key[key]  # a later call generates it again
            elif detached.followers == 0:
                log.info("detached_generation_finished_unfollowed", job_key=key)
            with contextlib.suppress(Exception):
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()

    def _expire(self) -> None:
        now = time.monotonic()
        stale = [
            k
            for k, d in self._by_key.items()
            if d.done and d.followers == 0 and now - d.finished_at > self._retain_s
        ]
        for key in stale:
            del self._by_key[key]

    def _trim(self) -> None:
        over = len(self._by_key) - self._max_kept
        if over <= 0:
            return
        for key in [k for k, d in self._by_key.items() if d.done and d.followers == 0][:over]:
            del self._by_key[key]
