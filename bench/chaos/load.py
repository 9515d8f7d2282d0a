"""Steady streaming load and recovery probes, recorded per request.

:class:`SteadyLoad`: each tenant runs ``workers_per_tenant`` workers; each loops one streaming
generation at a time through the SDK (``retry=None``: every refusal and failure is seen raw,
nothing is hidden behind a retry) until told to stop. Every request leaves a :class:`Record`
(times relative to the scenario's clock, node ids of its chunks, its outcome). A refused
worker waits the ``RetryInfo`` delay it was given (capped), a failed one pauses briefly, so a
failing suite is not hammered in a tight loop.

:class:`Prober`: one short generation per tenant per round, rounds back to back at a fixed
interval, so that :func:`bench.chaos.figures.recovery` can tell when every tenant is served
again, and which nodes a scheduler calls healthy (``Admin.ListNodes`` with an admin key).

Prompts are unique (a per-run nonce, tenant, worker and sequence number): every request looks
up the response cache and misses, so the cache is on every request's path (and the cache-kill
scenario means something) while every answer is really generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from sluice.runtime.waits import wait_event
from sluice.sdk.errors import SluiceRpcError
from sluice.v1 import admin_pb2, inference_pb2

MODEL = "tiny-random-llama"
COMPLETED = "completed"
REFUSED = "refused"
"""Refused with ``RetryInfo`` (whatever the status code)."""
LOST = "lost"
"""Not ended when the load stopped plus its grace; cancelled by the harness."""
STALL_BOUND_S = 5.0
"""A stream that goes longer than this without a chunk (from its start, between chunks, or
from its last chunk to its end) is *hung* (issue 17: streams on a frozen node end within 5 s)."""


class Clock:
    """Seconds since the scenario's start (``time.monotonic`` based)."""

    def __init__(self) -> None:
        self.origin = time.monotonic()
        self.origin_unix = time.time()

    def reset(self) -> None:
        """Make now the origin."""
        self.origin, self.origin_unix = time.monotonic(), time.time()

    def now(self) -> float:
        """Seconds since the origin."""
        return time.monotonic() - self.origin


class GenerateClient(Protocol):
    """What the load needs of :class:`sluice.AsyncClient`."""

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
        ignore_eos: bool = False,
    ) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        """Stream one generation."""
        ...


@dataclass
class Record:
    """One request of the load (or one probe). Times are seconds on the scenario's clock."""

    tenant: str
    start: float
    first: float | None = None
    """First chunk received."""
    last: float | None = None
    """Last chunk received."""
    end: float | None = None
    """The call ended (completed, failed, or cancelled as lost); None while open."""
    nodes: list[str] = field(default_factory=list)
    """Distinct node ids of its chunks, in order of appearance."""
    tokens: int = 0
    outcome: str = ""
    """COMPLETED, REFUSED, LOST, a status code name, or ``client:<Exception>``; "" while open."""
    code: str = ""
    """The status code name of a failed call ("" when completed or lost)."""
    reason: str = ""
    """``ErrorInfo.reason`` of a failed call, when it had one."""
    retry_after_s: float | None = None
    max_gap_s: float = 0.0
    """Longest time between start, chunks and end (the open tail is added by ``gap_until``)."""

    def chunk(self, now: float, node_id: str, tokens: int) -> None:
        """A chunk arrived."""
        self.max_gap_s = max(
            self.max_gap_s, now - (self.last if self.last is not None else self.start)
        )
        if self.first is None:
            self.first = now
        self.last = now
        self.tokens += tokens
        if node_id and node_id not in self.nodes:
            self.nodes.append(node_id)

    def finish(
        self, now: float, outcome: str, code: str = "", retry_after_s: float | None = None
    ) -> None:
        """The call ended."""
        self.max_gap_s = max(
            self.max_gap_s, now - (self.last if self.last is not None else self.start)
        )
        self.end, self.outcome, self.code, self.retry_after_s = now, outcome, code, retry_after_s

    def gap_until(self, now: float) -> float:
        """Longest time without a chunk, counting an open stream's tail up to ``now``."""
        if self.end is not None:
            return self.max_gap_s
        return max(self.max_gap_s, now - (self.last if self.last is not None else self.start))

    def hung(self, now: float, bound_s: float = STALL_BOUND_S) -> bool:
        """More than ``bound_s`` without a chunk while open (ended since or not)."""
        return self.gap_until(now) > bound_s

    @property
    def unavailable_after_first_token(self) -> bool:
        """Ended UNAVAILABLE after at least one chunk (a stream broken mid-way)."""
        return self.code == "UNAVAILABLE" and self.first is not None


@dataclass(frozen=True)
class LoadSettings:
    """How the steady load behaves."""

    model: str = MODEL
    max_new_tokens: int = 48
    workers_per_tenant: int = 2
    request_timeout_s: float = 60.0
    """Each call's deadline: long enough that a stall shows up as hung, not as a deadline."""
    refused_wait_cap_s: float = 1.0
    """A refused worker waits the RetryInfo delay, at most this long."""
    error_pause_s: float = 0.1
    """A failed worker pauses this long (an error loop must not spin)."""


async def run_one(
    client: GenerateClient,
    record: Record,
    prompt: str,
    settings: LoadSettings,
    clock: Clock,
    *,
    timeout_s: float | None = None,
) -> float:
    """Stream one generation into ``record``; returns how long the caller should pause."""
    stream = client.generate(
        settings.model,
        prompt,
        max_new_tokens=settings.max_new_tokens,
        timeout_s=timeout_s or settings.request_timeout_s,
        ignore_eos=True,
    )
    try:
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                record.chunk(clock.now(), chunk.node_id, len(chunk.token_ids))
    except SluiceRpcError as exc:
        retry = exc.retry_after_s
        outcome = REFUSED if retry is not None else exc.code.name
        record.finish(clock.now(), outcome, exc.code.name, retry)
        record.reason = exc.reason
        return (
            min(retry, settings.refused_wait_cap_s) if retry is not None else settings.error_pause_s
        )
    except Exception as exc:  # the SDK's own failures (no endpoint...), counted, not raised
        record.finish(clock.now(), f"client:{type(exc).__name__}")
        return settings.error_pause_s
    record.finish(clock.now(), COMPLETED)
    return 0.0


class SteadyLoad:
    """Closed-loop streaming load from several tenants; ``records`` holds every request."""

    def __init__(
        self, clients: dict[str, GenerateClient], settings: LoadSettings, clock: Clock
    ) -> None:
        self.clients = clients
        self.settings = settings
        self.clock = clock
        self.records: list[Record] = []
        self.stopped_at: float | None = None
        self._nonce = secrets.token_hex(4)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start every worker."""
        for tenant in self.clients:
            for worker in range(self.settings.workers_per_tenant):
                self._tasks.append(
                    asyncio.create_task(
                        self._worker(tenant, worker), name=f"load-{tenant}-{worker}"
                    )
                )

    async def _worker(self, tenant: str, worker: int) -> None:
        client = self.clients[tenant]
        n = 0
        while not self._stopping.is_set():
            n += 1
            record = Record(tenant, self.clock.now())
            self.records.append(record)
            prompt = f"chaos {self._nonce} {tenant} w{worker} #{n}: once upon a time"
            pause = await run_one(client, record, prompt, self.settings, self.clock)
            if pause > 0:
                await wait_event(self._stopping, pause)

    async def stop(self, grace_s: float) -> None:
        """No new requests; open ones get ``grace_s`` to end, then are cancelled and LOST.
        Only the first call acts."""
        if self.stopped_at is not None:
            return
        self.stopped_at = self.clock.now()
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        now = self.clock.now()
        for record in self.records:
            if record.end is None:
                record.finish(now, LOST)


class FleetClient(Protocol):
    """What the prober needs of :class:`sluice.AsyncClient` (with an admin tenant's key)."""

    def list_nodes(
        self, *, timeout_s: float | None = None
    ) -> Awaitable[list[admin_pb2.NodeStatus]]:
        """The scheduler's nodes."""
        ...


def serving_nodes(nodes: list[admin_pb2.NodeStatus]) -> frozenset[str]:
    """Ids of the nodes a scheduler calls healthy with their circuit closed."""
    closed = (admin_pb2.CIRCUIT_STATE_UNSPECIFIED, admin_pb2.CIRCUIT_STATE_CLOSED)
    return frozenset(n.info.node_id for n in nodes if n.healthy and n.circuit in closed)


@dataclass
class ProbeRound:
    """One probe per tenant, sent together, and the fleet as a scheduler saw it then."""

    start: float
    records: list[Record] = field(default_factory=list)
    fleet: frozenset[str] | None = None
    """Nodes healthy with a closed circuit (:func:`serving_nodes`); None: not known."""

    @property
    def ok(self) -> bool:
        """Every tenant's probe completed."""
        return bool(self.records) and all(r.outcome == COMPLETED for r in self.records)


class Prober:
    """Rounds of one short generation per tenant, one round every ``interval_s`` (a round
    that takes longer delays the next)."""

    def __init__(
        self,
        clients: dict[str, GenerateClient],
        clock: Clock,
        *,
        fleet: FleetClient | None = None,
        interval_s: float = 0.5,
        timeout_s: float = 5.0,
        max_new_tokens: int = 4,
    ) -> None:
        self.clients = clients
        self.clock = clock
        self.fleet = fleet
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.settings = LoadSettings(max_new_tokens=max_new_tokens, request_timeout_s=timeout_s)
        self.rounds: list[ProbeRound] = []
        self._nonce = secrets.token_hex(4)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing."""
        self._task = asyncio.create_task(self._loop(), name="chaos-prober")

    async def _loop(self) -> None:
        n = 0
        while True:
            n += 1
            started = self.clock.now()
            round_ = ProbeRound(started)
            self.rounds.append(round_)
            await asyncio.gather(
                self._read_fleet(round_), *(self._probe(t, n, round_) for t in self.clients)
            )
            await asyncio.sleep(max(0.0, started + self.interval_s - self.clock.now()))

    async def _read_fleet(self, round_: ProbeRound) -> None:
        if self.fleet is None:
            return
        with contextlib.suppress(Exception):  # unknown this round
            round_.fleet = serving_nodes(await self.fleet.list_nodes(timeout_s=self.timeout_s))

    async def _probe(self, tenant: str, n: int, round_: ProbeRound) -> None:
        record = Record(tenant, self.clock.now())
        round_.records.append(record)
        prompt = f"probe {self._nonce} {tenant} #{n}"
        await run_one(self.clients[tenant], record, prompt, self.settings, self.clock)

    async def stop(self) -> None:
        """Stop probing; an unfinished round is dropped."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.rounds = [r for r in self.rounds if all(x.end is not None for x in r.records)]
