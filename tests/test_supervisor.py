"""`sluice up`'s supervision: the restart policy against a fake clock, the watchdog's loop with
fake processes, and real etcd and Redis processes killed and restarted on their own ports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import pytest

from sluice.local.restarts import RestartPolicy, RestartRules
from sluice.local.stores import etcd_process, redis_process
from sluice.local.watchdog import SUPERVISOR_LOG, Watchdog, exit_text
from sluice.runtime.registry import etcd_client
from tests.harness import eventually

T = TypeVar("T")


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _crash_after(policy: RestartPolicy, clock: FakeClock, uptime_s: float) -> Any:
    """The child ran ``uptime_s`` since its last start, then crashed."""
    clock.advance(uptime_s)
    return policy.crashed()


def test_policy_doubles_the_delay_for_crashes_in_a_row_up_to_the_cap() -> None:
    """Quick crashes wait 0.5, 1, 2, 4, ... s, never more than the cap (a large window and crash
    budget here, so only the backoff is seen)."""
    clock = FakeClock()
    policy = RestartPolicy(RestartRules(max_crashes=100, window_s=1.0), clock)
    delays = []
    for _ in range(9):
        verdict = _crash_after(policy, clock, 5.0)
        assert verdict.restart
        delays.append(verdict.delay_s)
        clock.advance(verdict.delay_s)
        policy.started()
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert policy.restarts == 9


def test_policy_starts_the_backoff_afresh_after_a_stable_run() -> None:
    """A crash after the child stayed up ``stable_after_s`` waits the first delay again."""
    clock = FakeClock()
    policy = RestartPolicy(RestartRules(), clock)
    assert _crash_after(policy, clock, 1.0).delay_s == 0.5
    policy.started()
    assert _crash_after(policy, clock, 1.0).delay_s == 1.0
    policy.started()
    verdict = _crash_after(policy, clock, 60.0)
    assert verdict.restart and verdict.delay_s == 0.5
    assert verdict.uptime_s == 60.0
    assert verdict.restarts == 3


def test_policy_counts_uptime_from_the_given_start() -> None:
    """A child watched only after the suite started counts its uptime from its own start."""
    clock = FakeClock()
    policy = RestartPolicy(RestartRules(), clock, started_at=clock.now - 100.0)
    verdict = policy.crashed()
    assert verdict.uptime_s == 100.0 and verdict.delay_s == 0.5


def test_policy_gives_up_on_the_fifth_crash_within_a_minute() -> None:
    """Five crashes within 60 s: the fifth gives the child up; the four before it restart."""
    clock = FakeClock()
    policy = RestartPolicy(RestartRules(), clock)
    verdicts = []
    for _ in range(5):
        verdicts.append(_crash_after(policy, clock, 2.0))
        policy.started()
    assert [v.restart for v in verdicts] == [True, True, True, True, False]
    assert [v.crashes for v in verdicts] == [1, 2, 3, 4, 5]
    assert verdicts[-1].restarts == 4


def test_policy_forgets_crashes_older_than_the_window() -> None:
    """Crashes spread wider than the window never add up to a give-up."""
    clock = FakeClock()
    policy = RestartPolicy(RestartRules(), clock)
    for _ in range(20):
        verdict = _crash_after(policy, clock, 20.0)
        assert verdict.restart
        assert verdict.crashes <= 3
        policy.started()


@dataclass
class FakeProc:
    """What the watchdog reads of a ``Popen``."""

    pid: int
    returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


@dataclass
class FakeProcess:
    """A process the watchdog can restart, with no process behind it."""

    name: str
    log_path: Path
    address: str = "127.0.0.1:1"
    proc: FakeProc = field(default_factory=lambda: FakeProc(100))
    serving: bool = True
    respawns: int = 0
    fail_respawn: bool = False

    def respawn(self) -> None:
        if self.fail_respawn:
            raise FileNotFoundError("no such binary")
        self.respawns += 1
        self.proc = FakeProc(self.proc.pid + 1)
        self.serving = False

    def ready(self) -> bool:
        return self.serving


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _watchdog(tmp_path: Path, *names: str) -> tuple[Watchdog, FakeClock, list[str], list[Any]]:
    clock, said = FakeClock(), []
    dog = Watchdog(tmp_path, said.append, RestartRules(), clock)
    processes = [FakeProcess(n, tmp_path / f"{n}.log") for n in names]
    for process in processes:
        dog.watch(process)
    return dog, clock, said, processes


def test_watchdog_restarts_a_killed_process_after_the_delay_and_logs_each_step(
    tmp_path: Path,
) -> None:
    """A process killed by SIGKILL is restarted 0.5 s later, not before, with the exit, the
    restart and its return to service logged to the console, supervisor.log and its own log;
    the other process is not touched."""
    dog, clock, said, (node, other) = _watchdog(tmp_path, "node-2", "node-1")
    node.proc.returncode = -signal.SIGKILL
    dog.poll()
    assert said == ["node-2 (pid 100) was killed by SIGKILL after 0.0 s up; restart 1 in 0.5 s"]
    clock.advance(0.4)
    dog.poll()
    assert node.respawns == 0
    clock.advance(0.1)
    dog.poll()
    assert node.respawns == 1 and said[-1] == "restarted node-2 (pid 101, restart 1) on 127.0.0.1:1"
    dog.poll()
    assert len(said) == 2  # not serving yet: nothing to say
    node.serving = True
    clock.advance(3.0)
    dog.poll()
    assert said[-1] == "node-2 serves again, 3.0 s after restart 1"
    events = _events(tmp_path / SUPERVISOR_LOG)
    assert [e["event"] for e in events] == ["child_exited", "child_restarted", "child_serving"]
    assert events[0] | {"timestamp": ""} == {
        "timestamp": "",
        "level": "warning",
        "event": "child_exited",
        "logger": "sluice.up",
        "child": "node-2",
        "pid": 100,
        "exit_code": None,
        "signal": "SIGKILL",
        "reason": "was killed by SIGKILL",
        "uptime_s": 0.0,
        "crashes_in_window": 1,
        "restarts": 1,
        "next_delay_s": 0.5,
    }
    assert _events(node.log_path) == events
    assert other.respawns == 0 and not other.log_path.exists()


def test_watchdog_calls_its_hook_once_a_restarted_process_serves_again(tmp_path: Path) -> None:
    """``on_serving_again`` (`sluice up` re-places its services' threads there) runs once per
    restarted process back in service, not at the restart itself."""
    clock, calls = FakeClock(), []
    dog = Watchdog(tmp_path, clock=clock, on_serving_again=lambda: calls.append(clock()))
    node = FakeProcess("node-1", tmp_path / "node-1.log")
    dog.watch(node)
    node.proc.returncode = 1
    dog.poll()
    clock.advance(0.5)
    dog.poll()
    assert node.respawns == 1 and calls == []
    node.serving = True
    dog.poll()
    dog.poll()
    assert calls == [clock()]


def test_watchdog_gives_up_a_process_that_keeps_crashing(tmp_path: Path) -> None:
    """The fifth crash within a minute gives the process up: said once, never restarted again."""
    dog, clock, said, (cache,) = _watchdog(tmp_path, "cache")
    for _ in range(5):
        cache.proc.returncode = 1
        dog.poll()
        clock.advance(5.0)  # more than each delay (0.5, 1, 2, 4 s), 20 s for all five crashes
        dog.poll()
    assert cache.respawns == 4
    assert dog.given_up() == ["cache"]
    assert said[-1].startswith(
        "cache (pid 104) exited with code 1: 5 crashes within 60 s, given up and not restarted"
    )
    dog.poll()
    clock.advance(60.0)
    dog.poll()
    assert cache.respawns == 4
    assert _events(tmp_path / SUPERVISOR_LOG)[-1]["event"] == "child_given_up"


def test_watchdog_leaves_a_clean_exit_alone(tmp_path: Path) -> None:
    """Exit status 0 (a drained node, someone's SIGTERM) is reported, not restarted."""
    dog, clock, said, (node,) = _watchdog(tmp_path, "node-1")
    node.proc.returncode = 0
    dog.poll()
    clock.advance(10.0)
    dog.poll()
    assert node.respawns == 0
    assert said == ["node-1 exited cleanly (exit 0): not restarted"]


def test_watchdog_counts_a_failed_restart_as_a_crash(tmp_path: Path) -> None:
    """A restart that cannot even start the process is a crash: backoff, then another try."""
    dog, clock, said, (etcd,) = _watchdog(tmp_path, "etcd")
    etcd.proc.returncode = -signal.SIGKILL
    etcd.fail_respawn = True
    dog.poll()
    clock.advance(0.5)
    dog.poll()
    assert "could not be started (no such binary)" in said[-1]
    assert said[-1].endswith("restart 2 in 1 s")


def test_exit_text_names_signals_and_codes() -> None:
    """Negative Popen statuses are signals, others exit codes."""
    assert exit_text(-signal.SIGKILL) == "was killed by SIGKILL"
    assert exit_text(3) == "exited with code 3"


async def _retrying(call: Callable[[], Awaitable[T]], timeout_s: float = 20.0) -> T:
    """``call()`` until it does not raise (etcd accepts connections before it answers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except aetcd.exceptions.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.timeout(60)
async def test_killed_etcd_and_redis_come_back_on_their_ports_and_etcd_keeps_its_data(
    tmp_path: Path,
) -> None:
    """SIGKILL of real etcd and Redis: each is restarted on the same port (Redis with the same
    settings, etcd on the same data directory, so a key written before is still there)."""
    etcd = etcd_process(tmp_path / "etcd-data", tmp_path / "etcd.log").start()
    redis = redis_process(tmp_path / "redis-data", tmp_path / "redis.log").start()
    said: list[str] = []
    dog = Watchdog(tmp_path, said.append)
    try:
        client = etcd_client(etcd.address)
        await _retrying(lambda: client.put(b"/sluice/test", b"kept"))
        for store in (etcd, redis):
            dog.watch(store)
        argv = [list(p.proc.args) for p in (etcd, redis) if p.proc is not None]
        for store in (etcd, redis):
            assert store.proc is not None
            os.kill(store.proc.pid, signal.SIGKILL)

        def back() -> bool:
            dog.poll()
            return sum("serves again" in line for line in said) == 2

        await eventually(back, timeout=30, interval=0.1)
        assert [list(p.proc.args) for p in (etcd, redis) if p.proc is not None] == argv
        assert etcd.ready() and redis.ready()
        got = await _retrying(lambda: client.get(b"/sluice/test"))
        assert got is not None and got.value == b"kept"
        await client.close()
    finally:
        dog.clear()
        etcd.stop()
        redis.stop()
