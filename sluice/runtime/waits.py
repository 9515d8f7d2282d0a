"""Waiting on an event with a bound, without losing a cancellation.

``asyncio.wait_for(event.wait(), t)`` on Python 3.11 returns normally when its task is
cancelled in the same loop pass as the event is set (it sees the inner wait done and drops
the cancel), so a loop that waits that way can outlive ``task.cancel()`` and hang the
``gather`` of its ``stop()``. ``asyncio.timeout`` counts cancellations and does not.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed; whether it is set. A cancel is
    always raised."""
    try:
        async with asyncio.timeout(timeout_s if timeout_s > 0 else 0.0):  # NaN: no wait
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
