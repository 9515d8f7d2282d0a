"""``wait_event``: a bounded wait that never drops a cancellation (sluice.runtime.waits)."""

from __future__ import annotations

import asyncio

import pytest

from sluice.runtime.waits import wait_event


async def test_a_cancel_in_the_pass_the_event_is_set_stops_the_loop() -> None:
    """The loop's task is cancelled in the same pass as its wake-up event is set (as when a
    runner's ``stop()`` cancels it and a driver's ``finally`` wakes it): the cancel ends the
    loop. ``asyncio.wait_for`` on Python 3.11 returns instead and the loop goes on."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            event.clear()
            await wait_event(event, 5.0)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)  # waiting
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)


async def test_it_answers_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5.0)
    assert await wait_event(event, 0.0)  # already set: no wait
    event.clear()
    assert not await wait_event(event, -1.0)  # a bound already past: no wait
