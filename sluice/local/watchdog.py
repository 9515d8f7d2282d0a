"""The loop around :class:`~sluice.local.restarts.RestartPolicy`: watches `sluice up`'s processes,
restarts the ones that crash, and says so.

A crash is an exit with a non-zero status or by a signal; the process is started again with
its own command line (same ports, same data directory), after the delay the policy gives, or
given up when the policy says so. A clean exit (status 0: a drained node, someone's SIGTERM)
is reported and not restarted. Every event goes to the console (``say``) and, as one JSON line,
to ``<logs>/supervisor.log`` and to the process's own log, where it sits between the two runs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sluice.local.restarts import RestartPolicy, RestartRules

SUPERVISOR_LOG = "supervisor.log"


class Restartable(Protocol):
    """A process the watchdog restarts: a service child of `sluice up` or a store."""

    @property
    def name(self) -> str:
        """Its name in messages and logs."""

    @property
    def address(self) -> str:
        """Where clients reach it (the same after a restart)."""

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The running (or exited) process."""

    @property
    def log_path(self) -> Path:
        """Its own log."""

    def respawn(self) -> None:
        """Start it again with the same command line; returns at once."""

    def ready(self) -> bool:
        """Whether it serves now (a check bounded to a fraction of a second)."""


@dataclass
class _Watch:
    """One watched process and what the watchdog is doing about it."""

    process: Restartable
    policy: RestartPolicy
    restart_at: float | None = None
    """Set while the backoff before a restart runs."""
    restarted_at: float | None = None
    """Set from a restart until the process serves again."""
    done: str = ""
    """Why it is no longer watched ('given up', 'exited cleanly'); empty while it is."""


class Watchdog:
    """Restarts crashed processes; driven by ``poll``, which the owner's loop calls."""

    def __init__(
        self,
        logs: Path,
        say: Callable[[str], None] = lambda _m: None,
        rules: RestartRules | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_serving_again: Callable[[], None] = lambda: None,
    ) -> None:
        self.logs = logs
        self.on_serving_again = on_serving_again
        """Called once a restarted process serves again (`sluice up` re-places its threads)."""
        self.say = say
        self.rules = rules or RestartRules()
        self._clock = clock
        self._watches: list[_Watch] = []

    def watch(self, process: Restartable, started_at: float | None = None) -> None:
        """Watch ``process`` from the next ``poll`` on; it is running now, started at
        ``started_at`` on this watchdog's clock (default: now)."""
        policy = RestartPolicy(self.rules, self._clock, started_at)
        self._watches.append(_Watch(process, policy))

    def clear(self) -> None:
        """Watch nothing any more (before the owner stops the processes)."""
        self._watches.clear()

    def given_up(self) -> list[str]:
        """Names of the processes given up after crashing too often."""
        return [w.process.name for w in self._watches if w.done == "given up"]

    def poll(self) -> None:
        """One pass: notice exits and schedule restarts, start restarts that are due, report
        restarted processes that serve again. Returns soon; touches nothing else."""
        for watch in self._watches:
            if watch.done:
                continue
            if watch.restart_at is not None:
                if self._clock() >= watch.restart_at:
                    self._restart(watch)
                continue
            proc = watch.process.proc
            status = None if proc is None else proc.poll()
            if status is None:
                if watch.restarted_at is not None and watch.process.ready():
                    self._serving_again(watch)
            elif status == 0:
                watch.done = "exited cleanly"
                self._event(watch, "info", "child_exited_cleanly", pid=_pid(watch), exit_code=0)
                self.say(f"{watch.process.name} exited cleanly (exit 0): not restarted")
            else:
                self._crashed(watch, status)

    def _crashed(self, watch: _Watch, status: int | None, why: str = "") -> None:
        name, pid = watch.process.name, _pid(watch)
        how = why or exit_text(status)
        verdict = watch.policy.crashed()
        fields: dict[str, Any] = {
            "pid": pid,
            "exit_code": status if status is not None and status >= 0 else None,
            "signal": signal_name(status),
            "reason": how,
            "uptime_s": round(verdict.uptime_s, 1),
            "crashes_in_window": verdict.crashes,
            "restarts": verdict.restarts,
        }
        if not verdict.restart:
            watch.done = "given up"
            self._event(watch, "error", "child_given_up", **fields)
            self.say(
                f"{name} (pid {pid}) {how}: {verdict.crashes} crashes within "
                f"{self.rules.window_s:g} s, given up and not restarted; the rest keeps "
                f"running. See {watch.process.log_path}"
            )
            return
        watch.restart_at = self._clock() + verdict.delay_s
        watch.restarted_at = None
        self._event(watch, "warning", "child_exited", **fields, next_delay_s=verdict.delay_s)
        self.say(
            f"{name} (pid {pid}) {how} after {verdict.uptime_s:.1f} s up; "
            f"restart {verdict.restarts} in {verdict.delay_s:g} s"
        )

    def _restart(self, watch: _Watch) -> None:
        watch.restart_at = None
        process = watch.process
        try:
            process.respawn()
        except OSError as exc:
            self._crashed(watch, None, f"could not be started ({exc})")
            return
        watch.policy.started()
        watch.restarted_at = self._clock()
        pid, restarts = _pid(watch), watch.policy.restarts
        self._event(
            watch, "info", "child_restarted", pid=pid, restarts=restarts, address=process.address
        )
        self.say(f"restarted {process.name} (pid {pid}, restart {restarts}) on {process.address}")

    def _serving_again(self, watch: _Watch) -> None:
        took = self._clock() - (watch.restarted_at or 0.0)
        watch.restarted_at = None
        restarts = watch.policy.restarts
        self._event(
            watch,
            "info",
            "child_serving",
            pid=_pid(watch),
            restarts=restarts,
            after_s=round(took, 1),
        )
        self.say(f"{watch.process.name} serves again, {took:.1f} s after restart {restarts}")
        self.on_serving_again()

    def _event(self, watch: _Watch, level: str, event: str, **fields: Any) -> None:
        """One JSON line in supervisor.log and in the process's own log."""
        line = json.dumps(
            {
                "timestamp": datetime.now(UTC).isoformat(),
                "level": level,
                "event": event,
                "logger": "sluice.up",
                "child": watch.process.name,
                **fields,
            }
        )
        for path in (self.logs / SUPERVISOR_LOG, watch.process.log_path):
            with path.open("a") as log:
                log.write(line + "\n")


def _pid(watch: _Watch) -> int | None:
    proc = watch.process.proc
    return None if proc is None else proc.pid


def exit_text(status: int | None) -> str:
    """How a process ended, in words: ``exited with code 3``, ``was killed by SIGKILL``."""
    if status is None:
        return "ended"
    name = signal_name(status)
    return f"was killed by {name}" if name else f"exited with code {status}"


def signal_name(status: int | None) -> str | None:
    """The signal that ended a process with this ``Popen.returncode`` (negative), if any."""
    if status is None or status >= 0:
        return None
    try:
        return signal.Signals(-status).name
    except ValueError:
        return f"signal {-status}"
