"""``drain`` for engines that keep their requests in ``_jobs`` under ``_lock`` (the built-in
engines' :class:`~inference_node.engine.base.ThreadedEngine` and the vLLM engine)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from inference_node.model_types import LanguageModel

log = structlog.get_logger(__name__)


class Draining:
    """Mixin: stop taking requests, wait for the ones in flight, then cancel what is left.
    The engine sets the attributes below and implements :meth:`_cancel_job`; it wakes the
    ``_idle_waiters`` when its last job ends."""

    _lm: LanguageModel
    _lock: contextlib.AbstractContextManager[Any]  # a Lock or an RLock
    _closed: bool
    _jobs: dict[str, Any]
    _idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]

    def _cancel_job(self, job: Any) -> None:
        raise NotImplementedError

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - the Engine interface
        """Refuse new requests, wait up to ``timeout`` s for in-flight ones, cancel the rest.

        Cancelled running requests end at the engine's next step.
        """
        loop = asyncio.get_running_loop()
        idle = asyncio.Event()
        with self._lock:
            self._closed = True
            if self._jobs:
                self._idle_waiters.append((loop, idle))
            else:
                idle.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await idle.wait()
        with self._lock:
            left = list(self._jobs.values())
        for job in left:
            self._cancel_job(job)
        log.info("engine_drained", model=self._lm.name, cancelled=len(left))
